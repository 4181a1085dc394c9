package keyserver

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/enclavekeys/enclave/internal/api"
	"github.com/enclavekeys/enclave/internal/audit"
	"github.com/enclavekeys/enclave/internal/store"
)

// TestRestoredStoreNeverReleases (issue 31): a store restored from a
// backup is behind its audit log. Started on it, the key service refuses
// to serve unless told it was restored on purpose; then it leases no SPI
// range twice under one server key (the log's leases raise the counters),
// writes the restore in the log, and starts again normally after.
func TestRestoredStoreNeverReleases(t *testing.T) {
	l := newLab(t)
	setup(t, l)
	ctx := context.Background()
	srv := l.client(idServer)
	lease := func(cl client) *api.SPILease {
		t.Helper()
		r, err := cl.LeaseSPIs(ctx, &api.LeaseSPIsRequest{Peer: 7, Generation: 1, Count: 1000})
		if err != nil {
			t.Fatal(err)
		}
		return r
	}
	lease(srv) // 0-999
	dbPath := filepath.Join(l.dir, "enclave.db")
	backup := filepath.Join(l.dir, "backup.db")
	copyFile(t, dbPath, backup) // every commit is synced: the file is whole
	if r := lease(srv); r.First != 1000 {
		t.Fatalf("second lease from %d", r.First)
	}
	if _, err := l.client(idAdmin).AddDevice(ctx, &api.AddDeviceRequest{Name: "late", Role: "client", Enclave: 7}); err != nil {
		t.Fatal(err)
	}
	l.stop()
	copyFile(t, backup, dbPath) // the restore

	start := func(restored bool) (*Service, store.Store, audit.Sink, error) {
		t.Helper()
		st, err := store.OpenBolt(dbPath, testKEK(t))
		if err != nil {
			t.Fatal(err)
		}
		al, err := audit.Open(l.audit, l.clock.Now, st)
		if err != nil {
			st.Close()
			t.Fatalf("the restored store's anchor refuses its log: %v", err)
		}
		ok, err := store.OrgKey(ctx, st, testKEK(t), nil, false)
		if err != nil {
			t.Fatal(err)
		}
		svc, err := New(Config{Store: st, Roots: l.auth.Roots(), Audit: al, Clock: l.clock, OrgKey: ok})
		if err != nil {
			t.Fatal(err)
		}
		f, err := os.Open(l.audit)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		return svc, st, al, svc.Reconcile(ctx, f, restored)
	}
	closeAll := func(svc *Service, st store.Store, al audit.Sink) {
		svc.Close()
		al.Close()
		st.Close()
	}
	svc, st, al, err := start(false)
	if !errors.Is(err, ErrStoreBehind) || !strings.Contains(err.Error(), "--restored") {
		t.Fatalf("a restored store served without --restored: %v", err)
	}
	closeAll(svc, st, al)

	svc, st, al, err = start(true)
	if err != nil {
		t.Fatalf("--restored: %v", err)
	}
	view, _ := st.View(ctx)
	if got := view.LeasedSPIs(3, 7, 258, 1); got != 2000 {
		t.Fatalf("SK(3,7,258,1) leased up to %d after the restore, want 2000 (the log's mark)", got)
	}
	if _, ok := view.Device("late"); ok {
		t.Fatal("the restore kept a change made after the backup")
	}
	closeAll(svc, st, al)
	// The restore is in the log: the next start needs no flag, and the
	// log still verifies.
	svc, st, al, err = start(false)
	if err != nil {
		t.Fatalf("a start after the restore: %v", err)
	}
	closeAll(svc, st, al)
	raw := readFile(t, l.audit)
	if !strings.Contains(raw, `"rpc":"restore"`) || !strings.Contains(raw, "SPI counters raised") {
		t.Fatalf("the restore and the raise are not in the log:\n%s", raw)
	}
	f, _ := os.Open(l.audit)
	defer f.Close()
	if _, err := audit.Verify(f); err != nil {
		t.Fatal(err)
	}

	// A store with nothing committed beside a log of changes, or of
	// another log: refused the same way.
	h, err := readHistory(strings.NewReader(raw))
	if err != nil {
		t.Fatal(err)
	}
	if h.head == "" || h.leased[leaseKey{3, 7, 258, 1}] != 2000 {
		t.Fatalf("history: head %q, leased %v", h.head, h.leased)
	}
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, b, 0o600); err != nil {
		t.Fatal(err)
	}
}
