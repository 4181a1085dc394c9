package gateway

import (
	"net/netip"
	"testing"
	"time"

	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/registry"
)

// TestBlindWindow: a pair's window opens at its first held packet and
// closes at the first packet read after it, whatever else is held or
// read; status reports the open and the last window.
func TestBlindWindow(t *testing.T) {
	var b blindState
	b.init()
	p, q := registry.NewPair(1, 2), registry.NewPair(1, 3)
	t0 := time.Unix(1000, 0)
	if d := b.read(p, t0); d != 0 {
		t.Fatalf("a read with no window open closed one of %v", d)
	}
	b.held(p, t0)
	b.held(p, t0.Add(100*time.Millisecond)) // still the same window
	b.held(q, t0.Add(50*time.Millisecond))
	if d := b.read(p, t0.Add(300*time.Millisecond)); d != 300*time.Millisecond {
		t.Fatalf("the window closed at %v, want 300ms", d)
	}
	if d := b.read(p, t0.Add(400*time.Millisecond)); d != 0 {
		t.Fatalf("a closed window closed again: %v", d)
	}
	w := b.windows(nil)
	if w["1-2"].Last != 0.3 || !w["1-2"].Since.IsZero() || !w["1-3"].Since.Equal(t0.Add(50*time.Millisecond)) || w["1-3"].Last != 0 {
		t.Fatalf("windows %+v", w)
	}
	if b.open.Load() != 1 {
		t.Fatalf("%d windows open, want 1", b.open.Load())
	}
}

// TestNudgeBudget: nudges towards one address are bounded (64, then one
// every ten seconds), so that a client whose new SAs the gateway never
// gets the keys of does not make a new SA a second for ever; another
// address has its own budget.
func TestNudgeBudget(t *testing.T) {
	var b blindState
	b.init()
	a, other := netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("10.0.0.2")
	t0 := time.Unix(1000, 0)
	n := 0
	for i := range 200 {
		if b.nudgeAllowed(a, t0.Add(time.Duration(i)*time.Millisecond)) {
			n++
		}
	}
	if n != nudgeBurst {
		t.Fatalf("%d nudges in 200 ms, want %d", n, nudgeBurst)
	}
	if !b.nudgeAllowed(other, t0) {
		t.Fatal("another address was refused")
	}
	if b.nudgeAllowed(a, t0.Add(5*time.Second)) || !b.nudgeAllowed(a, t0.Add(11*time.Second)) {
		t.Fatal("the budget does not refill at one every ten seconds")
	}
}

// TestNudgeWhenTableFull (attacker review): junk filling the late-join
// table with busy candidates does not stop a held SA's client from being
// told (bounded by its address's budget), and a packet of a known SA from
// another sender neither moves its proofs nor spends its nudges.
func TestNudgeWhenTableFull(t *testing.T) {
	var l lateJoin
	l.init()
	now := time.Unix(1000, 0)
	dst := netip.MustParseAddrPort("10.0.0.9:1000")
	for i := range maxCandidates {
		src := netip.AddrFrom4([4]byte{10, 1, byte(i >> 8), byte(i)})
		k := saKey{spi: keys.SPI(0x80000000 | uint32(i+1))}
		for range 5 {
			l.observe(k, src, dst, 1, make([]byte, 16), now)
		}
	}
	victim := saKey{spi: 0x80ffffff}
	if !l.observe(victim, netip.MustParseAddr("10.2.0.1"), dst, 1, make([]byte, 16), now) {
		t.Fatal("a held SA with no room in the table is not due a nudge")
	}
	k := saKey{spi: 0x80000001}
	l.nudged(k, now)
	if l.observe(k, netip.MustParseAddr("10.9.9.9"), netip.MustParseAddrPort("10.9.9.8:1000"), 1024, make([]byte, 16), now.Add(2*time.Second)) {
		t.Fatal("another sender with the SA's SPI was due a nudge")
	}
	if c := l.m[k]; c.dst != dst || c.sparseAt != (time.Time{}) || c.nudges != 1 {
		t.Fatalf("another sender changed the candidate: %+v", c)
	}
}
