package gateway

import (
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/enclavekeys/enclave/internal/registry"
)

// The blind window (DESIGN §8c). A gateway that meets an SA of a pair it
// is granted but cannot read (it restarted and cannot derive, or its keys
// for the SA never came) holds that SA's packets: it drops them, unread,
// unless the operator chose --fail-open, so that nothing of a granted pair
// crosses it unjudged. It gets the keys within a round trip: it tells the
// SA's sender, with an UnknownSA message as from the SA's other end, that
// the SA is not held there. The message is not authenticated and can only
// prompt a handshake (docs/PROTOCOL.md, UnknownSA): the client makes a new
// SA at once, its handshake crosses the gateway, which asks for the keys
// (need-key), and the server delivers them before it lets the client send
// (direct key exchange). The front end sends the nudge: the relay to its
// own agents, framed as from the server; the inline gateway from a raw
// socket with the server's address. A sender that is the server (it
// ignores UnknownSA) is reached by late join instead (latejoin.go).
//
// The window is measured per pair: from the first packet held to the
// first packet of the pair read after it.

const (
	// nudgeEvery: one nudge per SA direction this often at most (an agent
	// acts on one a second per SA).
	nudgeEvery = time.Second
	// maxNudges: after this many, an SA direction whose keys never come
	// (the server refuses the gateway the pair) is held without more.
	maxNudges = 3
	// nudgeRate and nudgeBurst bound the nudges towards one address
	// whatever its SAs: a client whose new SAs the gateway never gets
	// the keys of would otherwise make a new SA a second for ever.
	nudgeRate, nudgeBurst = 0.1, 64
)

// blindState is what the gateway holds back, by pair.
type blindState struct {
	open atomic.Int32 // pairs in a window now: the read path looks only then
	mu   sync.Mutex
	// since is when each pair's window opened; last the length of its
	// last closed window.
	since  map[registry.Pair]time.Time
	last   map[registry.Pair]time.Duration
	lastAt map[registry.Pair]time.Time
	// nudges are the per-address budgets of nudges.
	nudges budget
}

func (b *blindState) init() {
	b.since, b.last, b.lastAt = map[registry.Pair]time.Time{}, map[registry.Pair]time.Duration{}, map[registry.Pair]time.Time{}
	b.nudges.rate, b.nudges.burst = nudgeRate, nudgeBurst
}

// nudgeAllowed takes one nudge of the budget of the address it goes to.
func (b *blindState) nudgeAllowed(to netip.Addr, now time.Time) bool {
	return b.nudges.allow(to, now)
}

// held notes a packet of pair p held at now.
func (b *blindState) held(p registry.Pair, now time.Time) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if _, ok := b.since[p]; !ok {
		b.since[p] = now
		b.open.Add(1)
	}
}

// read notes a packet of pair p read at now, and returns the window it
// closes (0 if none was open).
func (b *blindState) read(p registry.Pair, now time.Time) time.Duration {
	if b.open.Load() == 0 {
		return 0
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	s, ok := b.since[p]
	if !ok {
		return 0
	}
	delete(b.since, p)
	b.open.Add(-1)
	d := max(now.Sub(s), time.Nanosecond)
	b.last[p], b.lastAt[p] = d, now
	return d
}

// BlindWindow is a pair the gateway held packets of, for status.
type BlindWindow struct {
	// Since is when the open window began (zero: none is open).
	Since time.Time `json:"since,omitzero"`
	// Last is the length of the last window that closed, in seconds,
	// and LastEnded when it closed.
	Last      float64   `json:"last_seconds,omitempty"`
	LastEnded time.Time `json:"last_ended,omitzero"`
}

// windows reports every pair's open and last window.
func (b *blindState) windows(names *pairNames) map[string]BlindWindow {
	b.mu.Lock()
	defer b.mu.Unlock()
	out := map[string]BlindWindow{}
	for p, s := range b.since {
		w := out[names.of(p)]
		w.Since = s
		out[names.of(p)] = w
	}
	for p, d := range b.last {
		w := out[names.of(p)]
		w.Last, w.LastEnded = d.Seconds(), b.lastAt[p]
		out[names.of(p)] = w
	}
	return out
}

// nudger sends a nudge: an UnknownSA naming spi to an end of the SA
// between the data endpoints src and dst, as from the other end's control
// port; fromAgent says src is one of a relay's agents (the packet came on
// its data port). Set by the front end; nil sends none.
type nudger func(src, dst netip.AddrPort, spi uint32, fromAgent bool)
