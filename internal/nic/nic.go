// Package nic models a NIC's receive path both ways (the patent's Fig 9A
// and 9B), to show what hierarchical keys buy:
//
//   - NIC (hierarchical): a key table of fixed capacity holding server or
//     pair keys, a derivation engine that turns a packet's VC and SPI into
//     its SA key, and a decrypt engine. Its memory does not grow with the
//     number of SAs: three entries serve any number of them.
//   - StatefulNIC (conventional): a table of fixed capacity holding one SA
//     key per SA. It fails at its capacity plus one.
//
// Both decrypt real packets with the real key schedule and AES-GCM.
package nic

import (
	"errors"
	"fmt"
	"sync"

	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/packet"
	"github.com/enclavekeys/enclave/internal/sa"
)

// ErrTableFull is returned when a table is at its capacity.
var ErrTableFull = sa.ErrTableFull

// ErrUnknownSA: the stateful NIC holds no key for the packet's SPI.
var ErrUnknownSA = errors.New("nic: no SA with this SPI in the table")

// The sizes a NIC spends per table entry, as hardware would lay it out: the
// key plus the index that selects it.
const (
	// HierarchicalEntryBytes: a 256-bit SK or EK, plus level, two enclave
	// ids, a server id and the generation parity (10 bytes, padded to 16).
	HierarchicalEntryBytes = keys.KeySize + 16
	// StatefulEntryBytes: a 256-bit SA key plus its 4-byte SPI and a
	// 4-byte tag of version and flags.
	StatefulEntryBytes = keys.KeySize + 8
)

// NIC is the hierarchical model: key table, derivation engine, decrypt
// engine. It holds no per-SA state. Safe for concurrent use.
type NIC struct {
	table  *sa.KeyTable
	engine *sa.Opener
}

// New returns a NIC whose key table holds capacity entries.
func New(capacity int) *NIC {
	t := sa.NewKeyTable(capacity)
	return &NIC{table: t, engine: sa.NewOpener(t, 0)}
}

// Install loads a server or pair key into the key table.
func (n *NIC) Install(e sa.Entry, key []byte) error {
	if e.Level != keys.LevelServer && e.Level != keys.LevelPair {
		return fmt.Errorf("nic: the key table holds server and pair keys, not %v", e.Level)
	}
	return n.table.Add(e, key)
}

// Receive decrypts pkt in place and returns the inner packet.
func (n *NIC) Receive(pkt []byte) ([]byte, error) {
	var p packet.Parsed
	return n.engine.Open(&p, pkt)
}

// Entries is the number of keys in the table.
func (n *NIC) Entries() int { return n.table.Len() }

// TableBytes is the key memory in use, at HierarchicalEntryBytes per entry.
func (n *NIC) TableBytes() int { return n.table.Len() * HierarchicalEntryBytes }

// Stats returns the decrypt engine's counters.
func (n *NIC) Stats() packet.Snapshot { return n.engine.Stats() }

// StatefulNIC is the conventional model: one table entry per SA. Safe for
// concurrent use.
type StatefulNIC struct {
	capacity int
	mu       sync.RWMutex
	sas      map[keys.SPI]*packet.AEAD
	stats    packet.Stats
}

// NewStateful returns a stateful NIC whose SA table holds capacity entries
// (0: no limit, for measuring what the SAs would need).
func NewStateful(capacity int) *StatefulNIC {
	return &StatefulNIC{capacity: capacity, sas: map[keys.SPI]*packet.AEAD{}}
}

// Install loads the key of one SA. A full table refuses with ErrTableFull.
func (n *StatefulNIC) Install(spi keys.SPI, version keys.Version, ck []byte) error {
	if len(ck) != version.KeySize() {
		return packet.ErrKeyLength
	}
	g, err := packet.NewAEAD(version, ck)
	if err != nil {
		return err
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if _, ok := n.sas[spi]; !ok && n.capacity > 0 && len(n.sas) >= n.capacity {
		return fmt.Errorf("%w: %d SAs installed, capacity %d", ErrTableFull, len(n.sas), n.capacity)
	}
	n.sas[spi] = g
	return nil
}

// Receive decrypts pkt in place with the key of its SPI.
func (n *StatefulNIC) Receive(pkt []byte) ([]byte, error) {
	var p packet.Parsed
	if err := packet.Parse(&p, pkt); err != nil {
		n.stats.Drop(packet.CauseOf(err))
		return nil, err
	}
	n.mu.RLock()
	g := n.sas[p.SPI]
	n.mu.RUnlock()
	if g == nil {
		n.stats.Drop(packet.CauseNoKey)
		return nil, ErrUnknownSA
	}
	inner, err := packet.Open(p.Sealed[:0], &p, g)
	if err != nil {
		n.stats.Drop(packet.CauseOf(err))
		return nil, err
	}
	n.stats.Passed(len(inner))
	return inner, nil
}

// Entries is the number of SAs in the table.
func (n *StatefulNIC) Entries() int {
	n.mu.RLock()
	defer n.mu.RUnlock()
	return len(n.sas)
}

// TableBytes is the key memory in use, at StatefulEntryBytes per SA.
func (n *StatefulNIC) TableBytes() int { return n.Entries() * StatefulEntryBytes }

// Stats returns the counters.
func (n *StatefulNIC) Stats() packet.Snapshot { return n.stats.Snapshot() }
