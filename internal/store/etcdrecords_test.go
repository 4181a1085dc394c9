package store

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/etcdtest"
	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/registry"
)

func addServers(st *registry.State, from, n int) error {
	for i := from; i < from+n; i++ {
		k := keys.ServerID(i + 1)
		if err := st.AddDevice(registry.Device{Name: fmt.Sprintf("web%05d", i), Role: ca.RoleServer, Enclave: 3, ServerID: &k}); err != nil {
			return err
		}
	}
	return nil
}

// waitDevices waits until s's registry holds n devices.
func waitDevices(t *testing.T, s *Etcd, n int) *registry.State {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		st, err := s.View(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		if st.Devices.Len() == n {
			return st
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d devices, want %d", st.Devices.Len(), n)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestEtcdLargeChange: a change too large for one etcd transaction (1,500
// devices) commits whole by the journal; another replica sees all of it at
// once; the journal is settled into records and gone; small changes after
// it go on both replicas.
func TestEtcdLargeChange(t *testing.T) {
	c := etcdtest.Start(t, 1)
	a, _ := OpenEtcd(c.Endpoints, "", kek(t, 1))
	defer a.Close()
	b, _ := OpenEtcd(c.Endpoints, "", kek(t, 1))
	defer b.Close()
	ctx := context.Background()
	if _, err := a.Update(ctx, func(st *registry.State) error { return st.AddEnclave(3, "web") }); err != nil {
		t.Fatal(err)
	}
	waitDevices(t, b, 0)
	if _, err := a.Update(ctx, func(st *registry.State) error { return addServers(st, 0, 1500) }); err != nil {
		t.Fatal(err)
	}
	st := waitDevices(t, b, 1500)
	if _, ok := st.Device("web01499"); !ok {
		t.Fatal("the other replica lacks the last device")
	}
	j, _ := a.cli.Get(ctx, a.prefix+"j/", clientv3.WithPrefix(), clientv3.WithCountOnly())
	r, _ := a.cli.Get(ctx, a.recordsPrefix(), clientv3.WithPrefix(), clientv3.WithCountOnly())
	if j.Count != 0 || r.Count != 1500+2 {
		t.Fatalf("%d journal parts left, %d records (want 0, and 1,500 devices, the policy and the root)", j.Count, r.Count)
	}
	if _, err := b.Update(ctx, func(st *registry.State) error { return addServers(st, 1500, 1) }); err != nil {
		t.Fatal(err)
	}
	waitDevices(t, a, 1501)
	// A fresh replica loads it all and agrees.
	f, _ := OpenEtcd(c.Endpoints, "", kek(t, 1))
	defer f.Close()
	waitDevices(t, f, 1501)
}

// TestEtcdJournalNotSettled: a writer that died after committing a large
// change by its journal, before settling it: readers read the records with
// the journal over them, and the next writer settles it first.
func TestEtcdJournalNotSettled(t *testing.T) {
	c := etcdtest.Start(t, 1)
	a, _ := OpenEtcd(c.Endpoints, "", kek(t, 1))
	defer a.Close()
	ctx := context.Background()
	if _, err := a.Update(ctx, func(st *registry.State) error { return st.AddEnclave(3, "web") }); err != nil {
		t.Fatal(err)
	}
	// What Update does, but for the settling.
	base, _ := a.View(ctx)
	st := base.Fork()
	if err := addServers(st, 0, 300); err != nil {
		t.Fatal(err)
	}
	ws, _, err := recordWrites(st, a.policy, false)
	if err != nil {
		t.Fatal(err)
	}
	a.mu.Lock()
	dig, rev := a.dig.clone(), a.rootRev
	a.mu.Unlock()
	cm, err := a.commit(ctx, []clientv3.Cmp{clientv3.Compare(clientv3.ModRevision(a.rootKey()), "=", rev)}, ws, &dig, map[string][]byte{}, nil)
	if err != nil || cm.root.Journal == "" {
		t.Fatalf("commit: %v, journal %q", err, cm.root.Journal)
	}
	// A journal edited before it is settled is refused, whatever it holds.
	key := a.journalKey(cm.root.Journal, 0)
	orig, _ := a.cli.Get(ctx, key)
	for _, edit := range []string{`{"writes":[{"k":""}]}`, strings.Replace(string(orig.Kvs[0].Value), `"k":"`, `"k":"A`, 1)} {
		a.cli.Put(ctx, key, edit)
		x, _ := OpenEtcd(c.Endpoints, "", kek(t, 1))
		if _, err := x.View(ctx); !errors.Is(err, ErrTampered) {
			t.Fatalf("a replica on an edited journal (%.40s): %v, want ErrTampered", edit, err)
		}
		x.Close()
	}
	a.cli.Put(ctx, key, string(orig.Kvs[0].Value))
	b, _ := OpenEtcd(c.Endpoints, "", kek(t, 1))
	defer b.Close()
	waitDevices(t, b, 300) // records and the journal over them
	if _, err := b.Update(ctx, func(st *registry.State) error { return addServers(st, 300, 1) }); err != nil {
		t.Fatal(err)
	}
	waitDevices(t, a, 301)
	j, _ := a.cli.Get(ctx, a.prefix+"j/", clientv3.WithPrefix(), clientv3.WithCountOnly())
	if j.Count != 0 {
		t.Fatalf("%d journal parts left after the next writer", j.Count)
	}
}

// TestEtcdMigrate: an etcd holding the registry as one record (as before
// issue 36) is moved to records by the first replica that reads it; the
// old record goes.
func TestEtcdMigrate(t *testing.T) {
	c := etcdtest.Start(t, 1)
	ctx := context.Background()
	old := &registry.State{}
	old.AddEnclave(3, "web")
	if err := addServers(old, 0, 200); err != nil {
		t.Fatal(err)
	}
	k := kek(t, 1)
	raw, err := k.encodeState(old)
	if err != nil {
		t.Fatal(err)
	}
	a, _ := OpenEtcd(c.Endpoints, "", k)
	defer a.Close()
	if _, err := a.cli.Put(ctx, a.registryKey(), string(raw)); err != nil {
		t.Fatal(err)
	}
	st := waitDevices(t, a, 200)
	if len(st.Enclaves) != 1 {
		t.Fatalf("enclaves: %v", st.Enclaves)
	}
	if got, _ := a.cli.Get(ctx, a.registryKey()); len(got.Kvs) != 0 {
		t.Fatal("the old registry record is still there")
	}
	if _, err := a.Update(ctx, func(st *registry.State) error { return addServers(st, 200, 1) }); err != nil {
		t.Fatal(err)
	}
	waitDevices(t, a, 201)
}

// BenchmarkEtcdAdd: one device added to a registry of 100 and of 10,000
// devices in etcd (a real etcd server, one member): the cost does not grow
// with the registry.
func BenchmarkEtcdAdd(b *testing.B) {
	c := etcdtest.Start(b, 1)
	runs := 0
	for _, size := range []int{100, 10000} {
		b.Run(fmt.Sprint(size), func(b *testing.B) {
			runs++ // a fresh registry for each (the benchmark runs again with a larger N)
			s, err := OpenEtcd(c.Endpoints, fmt.Sprintf("/bench%d/", runs), kek(b, 1))
			if err != nil {
				b.Fatal(err)
			}
			defer s.Close()
			ctx := context.Background()
			if _, err := s.Update(ctx, func(st *registry.State) error {
				if err := st.AddEnclave(3, "web"); err != nil {
					return err
				}
				return addServers(st, 0, size)
			}); err != nil {
				b.Fatal(err)
			}
			b.ResetTimer()
			for i := range b.N {
				if _, err := s.Update(ctx, func(st *registry.State) error { return addServers(st, size+i, 1) }); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
