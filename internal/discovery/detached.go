package discovery

import (
	"crypto/sha256"
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
)

type detached struct {
	raw []byte
	at  time.Time
}

// detachedStore is a FIFO of entries by hash (under Decider.mu).
type detachedStore struct {
	m     map[[sha256.Size]byte]detached
	order [][sha256.Size]byte
}

// AddDetached keeps an entry that travelled apart, received at now, for
// the handshake whose stub names it.
func (d *Decider) AddDetached(e control.Entry, now time.Time) {
	d.mu.Lock()
	defer d.mu.Unlock()
	s := &d.detached
	if s.m == nil {
		s.m = map[[sha256.Size]byte]detached{}
	}
	if _, ok := s.m[e.Hash]; ok {
		return
	}
	for len(s.order) > 0 && (len(s.order) >= maxDetached || now.Sub(s.m[s.order[0]].at) > detachedTTL) {
		delete(s.m, s.order[0])
		s.order = s.order[1:]
	}
	s.m[e.Hash] = detached{raw: append([]byte(nil), e.Raw...), at: now}
	s.order = append(s.order, e.Hash)
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
