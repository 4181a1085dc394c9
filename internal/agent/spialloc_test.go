package agent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/enclavekeys/enclave/internal/registry"
	"github.com/enclavekeys/enclave/internal/store"

	"github.com/enclavekeys/enclave/internal/keys"
)

// testAllocator is an allocator of a server key made of seed, for
// enclaves 3-7 and server 258.
func testAllocator(t testing.TB, seed byte) *spiAllocator {
	t.Helper()
	sk := bytes.Repeat([]byte{seed}, 32)
	s, err := newSPIAllocator(sk, keys.VC{Enclave: 3, Peer: 7, Server: 258})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// TestSPIAllocator: two million indexes from one lease are all valid
// (non-zero, 31 bits) and all different, their high bit is set about half
// the time, none allocates, and an allocator of another server key gives
// another sequence while one of the same key gives the same (a restarted
// server walks the same permutation; its leases keep it apart).
func TestSPIAllocator(t *testing.T) {
	const n = 2_000_000
	s := testAllocator(t, 1)
	s.add(0, n+200)
	got := make([]uint32, n)
	high := 0
	for i := range got {
		x, err := s.index()
		if err != nil {
			t.Fatal(err)
		}
		if x == 0 || x > keys.MaxSPIIndex {
			t.Fatalf("index %#x", x)
		}
		if x>>30 == 1 {
			high++
		}
		got[i] = x
	}
	if high < n*45/100 || high > n*55/100 {
		t.Fatalf("bit 30 set in %d of %d indexes", high, n)
	}
	if a := testing.AllocsPerRun(100, func() { s.index() }); a != 0 {
		t.Errorf("an index costs %v allocations", a)
	}
	first := slices.Clone(got[:100])
	slices.Sort(got)
	for i := 1; i < n; i++ {
		if got[i] == got[i-1] {
			t.Fatalf("index %#x granted twice", got[i])
		}
	}
	other, same := testAllocator(t, 2), testAllocator(t, 1)
	other.add(0, 100)
	same.add(0, 100)
	agree, equal := 0, 0
	for _, x := range first {
		if y, _ := other.index(); x == y {
			agree++
		}
		if y, _ := same.index(); x == y {
			equal++
		}
	}
	if agree > 1 {
		t.Fatalf("allocators of two keys agree on %d of their first 100 indexes", agree)
	}
	if equal != 100 {
		t.Fatalf("two allocators of one key agree on only %d of 100 counter values", equal)
	}
}

// TestSPIAllocatorLeases: without a lease there is no index (a clear
// error, not a guess); leases are used in order, a lease reaching past the
// 2³¹ counter values is cut there, and lease requests start at
// firstSPILease, double while used, stay single while one is in flight,
// and are asked again at the same size after a failure.
func TestSPIAllocatorLeases(t *testing.T) {
	s := testAllocator(t, 1)
	if _, err := s.index(); !errors.Is(err, ErrNoSPILease) {
		t.Fatalf("no lease: %v", err)
	}
	n, ok := s.wantLease()
	if !ok || n != firstSPILease {
		t.Fatalf("first lease: %d %v", n, ok)
	}
	if _, again := s.wantLease(); again {
		t.Fatal("a second request while one is in flight")
	}
	s.leaseDone(false)
	if n, ok = s.wantLease(); !ok || n != firstSPILease {
		t.Fatalf("after a failure: %d %v", n, ok)
	}
	s.leaseDone(true)
	s.add(100, n)
	if _, ok := s.wantLease(); ok {
		t.Fatal("asked again with the whole lease left")
	}
	for range n/2 + 1 {
		if _, err := s.index(); err != nil {
			t.Fatal(err)
		}
	}
	if n, ok = s.wantLease(); !ok || n != 2*firstSPILease {
		t.Fatalf("second lease: %d %v", n, ok)
	}
	s.leaseDone(true)
	// The end of the counter space.
	e := testAllocator(t, 3)
	e.add(keys.MaxSPIIndex+1-3, 10)
	k := 0
	for {
		_, err := e.index()
		if errors.Is(err, ErrNoSPILease) {
			break
		}
		if err != nil || k > 3 {
			t.Fatalf("after %d more: %v", k, err)
		}
		k++
	}
	if k < 2 {
		t.Fatalf("only %d of the last 3 counter values gave an index", k)
	}
}

// TestSPIsNeverRepeatAcrossCrashes is the property that matters: whatever
// the order of grants, server crashes (the allocator and its unused
// leases lost), key server restarts (the store closed and opened again)
// and leases whose answer never arrived (committed, then lost), no SPI
// index is granted twice under one server key. The leases come from a
// real bbolt store through the registry, as the key service takes them.
func TestSPIsNeverRepeatAcrossCrashes(t *testing.T) {
	dir := t.TempDir()
	kek, _ := store.NewKEK(make([]byte, 32))
	path := filepath.Join(dir, "ks.db")
	open := func() *store.Bolt {
		st, err := store.OpenBolt(path, kek)
		if err != nil {
			t.Fatal(err)
		}
		return st
	}
	st := open()
	defer func() { st.Close() }()
	ctx := context.Background()
	_, err := st.Update(ctx, func(r *registry.State) error {
		for _, e := range []keys.EnclaveID{3, 7} {
			if err := r.AddEnclave(e, fmt.Sprint("e", e)); err != nil {
				return err
			}
		}
		return r.AllowPair(3, 7, time.Now())
	})
	if err != nil {
		t.Fatal(err)
	}
	lease := func(n uint32) (uint64, uint32) {
		var first uint64
		var got uint32
		if _, err := st.Update(ctx, func(r *registry.State) error {
			var err error
			first, got, err = r.LeaseSPIs(3, 7, 258, 1, n)
			return err
		}); err != nil {
			t.Fatal(err)
		}
		return first, got
	}
	rng := rand.New(rand.NewPCG(1, 2))
	seen := map[uint32]bool{}
	for run := range 30 {
		s := testAllocator(t, 9) // a server (re)started: same key, nothing of before
		s.leaseDone(true)
		crashes := 0
		for step := range 200 {
			switch op := rng.IntN(100); {
			case op < 3: // the server crashes
				s = testAllocator(t, 9)
				crashes++
			case op < 5: // the key server restarts
				st.Close()
				st = open()
			case op < 7: // a lease committed whose answer was lost
				lease(uint32(1 + rng.IntN(64)))
			default: // a grant, leasing when the allocator asks
				if n, ok := s.wantLease(); ok {
					first, got := lease(min(n, 64)) // small leases: many of them
					s.leaseDone(true)
					s.add(first, got)
				}
				x, err := s.index()
				if errors.Is(err, ErrNoSPILease) {
					continue
				}
				if err != nil {
					t.Fatal(err)
				}
				if seen[x] {
					t.Fatalf("run %d step %d (after %d crashes): index %#x granted twice", run, step, crashes, x)
				}
				seen[x] = true
			}
		}
	}
	if len(seen) < 3000 {
		t.Fatalf("only %d grants: the test did not exercise the allocator", len(seen))
	}
}

// TestSPIAllocatorKeptAcrossFetches: a server that fetches its keys
// again keeps each held key's allocator, so that an SPI granted before
// the fetch is not granted again after it.
func TestSPIAllocatorKeptAcrossFetches(t *testing.T) {
	o := pairOrg(t)
	server := o.agentFor(serverID("web1", 3, 258, "100.64.3.1/16"), nil, nil)
	allocs := func() map[skID]*spiAllocator {
		server.mu.RLock()
		defer server.mu.RUnlock()
		m := map[skID]*spiAllocator{}
		for id, k := range server.sks {
			m[id] = k.spis
		}
		return m
	}
	before := allocs()
	if len(before) == 0 {
		t.Fatal("the server holds no key")
	}
	for _, s := range before {
		if s == nil {
			t.Fatal("a key without an SPI allocator")
		}
		s.index()
	}
	if err := server.fetchKeys(context.Background()); err != nil {
		t.Fatal(err)
	}
	for id, s := range allocs() {
		if before[id] != s || s.next == 0 || s.end == 0 {
			t.Fatalf("key %v: the allocator was replaced by the fetch", id)
		}
	}
}
