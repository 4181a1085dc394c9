package store

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/enclavekeys/enclave/internal/audit"
	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/etcdtest"
	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/registry"
)

// TestEtcdConcurrentAdmins: two replicas (two clients) write concurrently;
// no update is lost and no server id is given twice.
func TestEtcdConcurrentAdmins(t *testing.T) {
	c := etcdtest.Start(t, 1)
	a, err := OpenEtcd(c.Endpoints, "", kek(t, 1))
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	b, _ := OpenEtcd(c.Endpoints, "", kek(t, 1))
	defer b.Close()
	ctx := context.Background()
	if _, err := a.Update(ctx, func(st *registry.State) error { return st.AddEnclave(3, "web") }); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	added, dups := 0, 0
	for r, s := range []*Etcd{a, b} {
		for w := 0; w < 4; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := 0; i < 10; i++ {
					k := keys.ServerID(i)
					_, err := s.Update(ctx, func(st *registry.State) error {
						return st.AddDevice(registry.Device{Name: fmt.Sprintf("r%d-w%d-%d", r, w, i), Role: ca.RoleServer, Enclave: 3, ServerID: &k})
					})
					mu.Lock()
					switch {
					case err == nil:
						added++
					case errors.Is(err, registry.ErrExists):
						dups++
					default:
						t.Error(err)
					}
					mu.Unlock()
				}
			}()
		}
	}
	wg.Wait()
	st, err := b.View(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if added != 10 || dups != 70 || st.Devices.Len() != 10 {
		t.Fatalf("%d added, %d refused as duplicates, %d stored", added, dups, st.Devices.Len())
	}
	// The org key: both replicas agree on one key.
	k1, err := OrgKey(ctx, a, kek(t, 1), nil, true)
	if err != nil {
		t.Fatal(err)
	}
	k2, err := OrgKey(ctx, b, kek(t, 1), nil, true)
	if err != nil || !k1.Equal(&k2) {
		t.Fatalf("replicas disagree on the org key: %v", err)
	}
	if _, err := OrgKey(ctx, b, kek(t, 2), nil, true); !errors.Is(err, ErrWrongKEK) {
		t.Fatalf("wrong KEK: %v", err)
	}
}

// TestEtcdLosesMember: a 3-member cluster keeps serving reads and writes
// after one member stops.
func TestEtcdLosesMember(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a 3-member etcd cluster")
	}
	c := etcdtest.Start(t, 3)
	s, err := OpenEtcd(c.Endpoints, "", kek(t, 1))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := s.Update(ctx, func(st *registry.State) error { return st.AddEnclave(1, "a") }); err != nil {
		t.Fatal(err)
	}
	c.StopMember(0)
	if _, err := s.Update(ctx, func(st *registry.State) error { return st.AddEnclave(2, "b") }); err != nil {
		t.Fatalf("write after losing a member: %v", err)
	}
	st, err := s.View(ctx)
	if err != nil || len(st.Enclaves) != 2 {
		t.Fatalf("read after losing a member: %v %+v", err, st)
	}
}

// TestEtcdAudit: replicas append concurrently to one chain, which
// verifies; an edited entry is named.
func TestEtcdAudit(t *testing.T) {
	c := etcdtest.Start(t, 1)
	ctx := context.Background()
	var logs []*EtcdAudit
	for i := 0; i < 3; i++ {
		s, err := OpenEtcd(c.Endpoints, "", kek(t, 1))
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		logs = append(logs, NewEtcdAudit(s, nil))
	}
	var wg sync.WaitGroup
	for _, l := range logs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 20; i++ {
				if err := l.Append(audit.Entry{Caller: "c", Role: "admin", RPC: "AddEnclave", Decision: audit.Allow}); err != nil {
					t.Error(err)
				}
			}
		}()
	}
	wg.Wait()
	res, err := logs[0].Verify(ctx)
	if err != nil || res.Entries != 60 {
		t.Fatalf("etcd audit: %+v %v", res, err)
	}
	// Tamper with entry 7 directly in etcd.
	key := logs[0].entryKey(7)
	got, _ := logs[0].cli.Get(ctx, key)
	logs[0].cli.Put(ctx, key, strings.Replace(string(got.Kvs[0].Value), "AddEnclave", "AddDevice", 1))
	var ve *audit.VerifyError
	if _, err := logs[0].Verify(ctx); !errors.As(err, &ve) || ve.Line != 7 {
		t.Fatalf("tampered etcd audit: %v", err)
	}
	logs[0].cli.Put(ctx, key, string(got.Kvs[0].Value))
	// Entries cut from the end are found against the MACed head; a head
	// rewritten without the KEK is refused, and no one extends the log.
	logs[0].cli.Delete(ctx, logs[0].entryKey(60))
	if _, err := logs[0].Verify(ctx); !errors.Is(err, audit.ErrAnchor) {
		t.Fatalf("last entry deleted: %v, want ErrAnchor", err)
	}
	logs[0].cli.Put(ctx, logs[0].headKey(), `{"record":{"seq":59,"hash":"00"},"mac":"00"}`)
	if _, err := logs[0].Verify(ctx); !errors.Is(err, ErrTampered) {
		t.Fatalf("forged head: %v, want ErrTampered", err)
	}
	if err := logs[1].Append(audit.Entry{Caller: "c", Role: "admin", RPC: "x", Decision: audit.Allow}); !errors.Is(err, ErrTampered) {
		t.Fatalf("append after a forged head: %v", err)
	}
}
