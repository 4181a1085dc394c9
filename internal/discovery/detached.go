package discovery

import (
	"crypto/sha256"
	"net/netip"
	"time"

	"github.com/enclavekeys/enclave/internal/control"
)

// Entries that travel apart (docs/PROTOCOL.md, "Path record"): a gateway
// whose entry would take a handshake past control.MaxHandshake sends it
// in a TypeEntry message just before the handshake, and leaves a stub in
// the path record. The server keeps such entries for a few seconds, and
// puts each in its stub's place when the handshake comes. The store is
// bounded: past maxDetached the oldest goes, so junk can only push out
// entries it outnumbers within their few milliseconds of waiting.

const (
	maxDetached = 4096
	detachedTTL = 5 * time.Second
	// entryRate and entryBurst bound the entries one source address may
	// have kept a second: a gateway sends one per handshake it tags apart,
	// and one source cannot push out the others' within their moments.
	entryRate, entryBurst = 1000.0, 2000.0
	maxSources            = 8192
)

type detached struct {
	raw []byte
	at  time.Time
}

// detachedStore is a FIFO of entries by hash (under Decider.mu), and
// each source's budget.
type detachedStore struct {
	m       map[[sha256.Size]byte]detached
	order   [][sha256.Size]byte
	sources map[netip.Addr]*tokens
}

// tokens is a token bucket.
type tokens struct {
	n  float64
	at time.Time
}

// AddDetached keeps an entry that travelled apart, received from src at
// now, for the handshake whose stub names it, and reports whether it was
// kept (false: src sent more than its share).
func (d *Decider) AddDetached(e control.Entry, src netip.Addr, now time.Time) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	s := &d.detached
	if s.m == nil {
		s.m = map[[sha256.Size]byte]detached{}
	}
	if s.sources == nil || len(s.sources) >= maxSources {
		s.sources = map[netip.Addr]*tokens{}
	}
	b := s.sources[src]
	if b == nil {
		b = &tokens{n: entryBurst, at: now}
		s.sources[src] = b
	}
	b.n, b.at = min(entryBurst, b.n+now.Sub(b.at).Seconds()*entryRate), now
	if b.n < 1 {
		return false
	}
	b.n--
	if x, ok := s.m[e.Hash]; ok {
		// The same entry again (a handshake sent again, signed alike):
		// it counts from now.
		x.at = now
		s.m[e.Hash] = x
		return true
	}
	for len(s.order) > 0 && (len(s.order) >= maxDetached || now.Sub(s.m[s.order[0]].at) > detachedTTL) {
		delete(s.m, s.order[0])
		s.order = s.order[1:]
	}
	s.m[e.Hash] = detached{raw: append([]byte(nil), e.Raw...), at: now}
	s.order = append(s.order, e.Hash)
	return true
}

// resolve puts in place of each stub of rec the entry that travelled
// apart for it, and reports the stubs whose entry is not (or no longer)
// here.
func (d *Decider) resolve(rec *control.PathRecord, now time.Time) []Disagreement {
	var out []Disagreement
	for i := range rec.Entries {
		if rec.Entries[i].Version != control.PathVersionStub {
			continue
		}
		d.mu.Lock()
		x, ok := d.detached.m[rec.Entries[i].Stub]
		d.mu.Unlock()
		if !ok || now.Sub(x.at) > detachedTTL {
			out = append(out, Disagreement{DetachedMissing, i, "the entry this stub names did not arrive (it travels apart, just before the handshake)"})
			continue
		}
		if err := rec.Resolve(i, x.raw); err != nil {
			out = append(out, Disagreement{DetachedMissing, i, err.Error()})
		}
	}
	return out
}
