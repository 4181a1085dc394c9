package agent

import (
	"context"
	"errors"
	"slices"
	"testing"

	"github.com/enclavekeys/enclave/internal/keys"
)

// TestSPIAllocator: two million indexes from one allocator are all valid
// (non-zero, 31 bits) and all different, their high bit is set about
// half the time, none allocates, and a second allocator gives another
// sequence.
func TestSPIAllocator(t *testing.T) {
	const n = 2_000_000
	s := newSPIAllocator()
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
	other := newSPIAllocator()
	same := 0
	for _, x := range first {
		if y, _ := other.index(); x == y {
			same++
		}
	}
	if same > 1 {
		t.Fatalf("two allocators agree on %d of their first 100 indexes", same)
	}
}

// TestSPIAllocatorExhausted: past 2³¹ counter values, no more indexes,
// with an error that says so.
func TestSPIAllocatorExhausted(t *testing.T) {
	s := newSPIAllocator()
	s.next = keys.MaxSPIIndex + 1 - 3
	n := 0
	for {
		_, err := s.index()
		if errors.Is(err, ErrSPIsExhausted) {
			break
		}
		if err != nil || n > 3 {
			t.Fatalf("after %d more: %v", n, err)
		}
		n++
	}
	if n < 2 {
		t.Fatalf("only %d of the last 3 counter values gave an index", n)
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
		if before[id] != s || s.next == 0 {
			t.Fatalf("key %v: the allocator was replaced by the fetch", id)
		}
	}
}
