package sa

import (
	"errors"
	"fmt"
	"maps"
	"sync"
	"sync/atomic"

	"github.com/enclavekeys/enclave/internal/keys"
)

// Errors of the key table.
var (
	// ErrNoKey: no key in the table covers the packet's VC and generation
	// parity.
	ErrNoKey = errors.New("sa: no key covers this packet's enclaves, server and generation")
	// ErrGeneration: the table covers the packet's enclaves and server, but
	// only under the other generation parity: the packet's SA belongs to a
	// generation this receiver does not hold (retired, or not yet learnt).
	ErrGeneration = errors.New("sa: the packet's generation (SPI parity) is not held")
	// ErrTableFull: the table is at its fixed capacity.
	ErrTableFull = errors.New("sa: key table full")
)

// Entry names one hierarchy key a table can hold: a server key SK(i,j,k,g)
// (Level server; Enclave = i, Peer = j, Server = k), a pair key EK(i,j,g)
// (Level pair), or the org key at generation g (Level org).
type Entry struct {
	Level         keys.Level
	Enclave, Peer keys.EnclaveID
	Server        keys.ServerID
	Generation    keys.Generation
	// Sub is, for a pair key, its level L in the table's layout (EK_L of
	// the level-L ids Enclave and Peer; 0 means 1).
	Sub int
}

// slot is where an entry lives: its level, the ids that select it from a
// packet's VC, and the generation parity (from the SPI). A newer generation
// of the same parity replaces the older one: a device holds at most the
// current and the previous generation (DESIGN §3).
type slot struct {
	level  keys.Level
	sub    uint8 // a pair key's level in the layout
	a, b   keys.EnclaveID
	k      keys.ServerID
	parity uint8
}

func (e *Entry) slot() (slot, error) {
	p := uint8(e.Generation.Parity())
	switch e.Level {
	case keys.LevelServer:
		if e.Enclave == 0 || e.Peer == 0 {
			return slot{}, keys.ErrEnclaveZero
		}
		return slot{keys.LevelServer, 0, e.Enclave, e.Peer, e.Server, p}, nil
	case keys.LevelPair:
		if e.Enclave == 0 || e.Peer == 0 {
			return slot{}, keys.ErrEnclaveZero
		}
		if e.Sub < 0 || e.Sub > keys.MaxLevels {
			return slot{}, keys.ErrLayoutLevel
		}
		return slot{keys.LevelPair, uint8(max(e.Sub, 1)), min(e.Enclave, e.Peer), max(e.Enclave, e.Peer), 0, p}, nil
	case keys.LevelOrg:
		return slot{level: keys.LevelOrg, parity: p}, nil
	}
	return slot{}, keys.ErrLevel
}

// tableState is one immutable version of the table; readers load it
// without locking.
type tableState struct {
	epoch   uint64 // changes with every mutation: cached keys go stale
	layout  keys.Layout
	entries map[slot]*keys.Deriver
}

// KeyTable holds the hierarchy keys of a receiver or sender and finds the
// one that covers a packet: its server key, else its pair key, else the org
// key. Lookups are lock-free; changes (rotations) copy the table. With a
// capacity it models a NIC's key memory, which fails rather than grows.
type KeyTable struct {
	capacity int
	mu       sync.Mutex // serialises writers
	state    atomic.Pointer[tableState]
}

// NewKeyTable returns an empty table holding at most capacity keys (0: no
// limit).
func NewKeyTable(capacity int) *KeyTable {
	t := &KeyTable{capacity: capacity}
	t.state.Store(&tableState{entries: map[slot]*keys.Deriver{}})
	return t
}

// Add puts key into the table as e, replacing the key of the same slot
// (same ids, same generation parity). A full table refuses a new slot with
// ErrTableFull.
func (t *KeyTable) Add(e Entry, key []byte) error {
	s, err := e.slot()
	if err != nil {
		return err
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	old := t.state.Load()
	scope := keys.Scope{Level: e.Level, Generation: e.Generation, HasGeneration: true, Layout: old.layout}
	if e.Level != keys.LevelOrg {
		scope.Enclave, scope.Peer = e.Enclave, e.Peer
	}
	switch e.Level {
	case keys.LevelServer:
		scope.Server = e.Server
	case keys.LevelPair:
		scope.Sub = e.Sub
	}
	d, err := keys.NewDeriver(key, scope)
	if err != nil {
		return err
	}
	if _, replacing := old.entries[s]; !replacing && t.capacity > 0 && len(old.entries) >= t.capacity {
		return fmt.Errorf("%w: capacity %d", ErrTableFull, t.capacity)
	}
	next := &tableState{epoch: old.epoch + 1, layout: old.layout, entries: maps.Clone(old.entries)}
	next.entries[s] = d
	t.state.Store(next)
	return nil
}

// Remove drops the key of e's slot if it holds e's generation, and reports
// whether it did. Cached SA keys derived from it stop being used at once.
func (t *KeyTable) Remove(e Entry) bool {
	s, err := e.slot()
	if err != nil {
		return false
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	old := t.state.Load()
	d, ok := old.entries[s]
	if !ok || d.Scope().Generation != e.Generation {
		return false
	}
	next := &tableState{epoch: old.epoch + 1, layout: old.layout, entries: maps.Clone(old.entries)}
	delete(next.entries, s)
	t.state.Store(next)
	return true
}

// SetLayout sets the org's sub-enclave layout (DESIGN §3a), by which
// pair keys of lower levels are found and derived from. A new layout
// empties the table: keys added under another layout do not derive the
// same SA keys.
func (t *KeyTable) SetLayout(l keys.Layout) {
	t.mu.Lock()
	defer t.mu.Unlock()
	old := t.state.Load()
	if old.layout == l {
		return
	}
	t.state.Store(&tableState{epoch: old.epoch + 1, layout: l, entries: map[slot]*keys.Deriver{}})
}

// Layout is the table's layout.
func (t *KeyTable) Layout() keys.Layout { return t.state.Load().layout }

// Len is the number of keys held.
func (t *KeyTable) Len() int { return len(t.state.Load().entries) }

// Capacity is the fixed capacity, or 0 for none.
func (t *KeyTable) Capacity() int { return t.capacity }

// lookup finds the most specific key covering vc under spi's parity. On a
// miss it tells ErrGeneration (a key exists for the other parity) from
// ErrNoKey.
func (st *tableState) lookup(vc keys.VC, spi keys.SPI) (*keys.Deriver, error) {
	p := uint8(spi.Parity())
	if d := st.find(vc, p); d != nil {
		return d, nil
	}
	if st.find(vc, p^1) != nil {
		return nil, ErrGeneration
	}
	return nil, ErrNoKey
}

func (st *tableState) find(vc keys.VC, p uint8) *keys.Deriver {
	if d := st.entries[slot{keys.LevelServer, 0, vc.Enclave, vc.Peer, vc.Server, p}]; d != nil {
		return d
	}
	// The most specific pair key: the deepest level first.
	for L := st.layout.Levels(); L >= 1; L-- {
		i, _ := st.layout.Prefix(L, vc.Enclave)
		j, _ := st.layout.Prefix(L, vc.Peer)
		if d := st.entries[slot{keys.LevelPair, uint8(L), min(i, j), max(i, j), 0, p}]; d != nil {
			return d
		}
	}
	return st.entries[slot{level: keys.LevelOrg, parity: p}]
}
