package registry

import (
	"errors"
	"fmt"
	"strings"

	"github.com/enclavekeys/enclave/internal/keys"
)

// SPI leases: an SPI must never repeat under one server key, across
// restarts and crashes of the server and across replicas that share its
// identity (the same SPI is the same CK, and both SAs count IVs from 1).
// A server therefore takes its SPIs from ranges of a counter that the
// registry hands out, each value once, in the same atomic update that
// records the new high-water mark. The server maps each counter value to
// an SPI index through a permutation of its own (see the agent).

// SPISpace is how many counter values one server key has: one per SPI
// index, 0 included (the permutation may map a value to index 0, which the
// allocator skips).
const SPISpace = keys.MaxSPIIndex + 1

// MaxSPILease is the most counter values one lease gives.
const MaxSPILease = 1 << 22

// ErrSPIsExhausted: every counter value of a server key was leased; the
// pair's next rotation brings a fresh key.
var ErrSPIsExhausted = errors.New("registry: every SPI of this server key was leased; rotate the pair")

// SPILease is the high-water mark of one server key's counter: values
// below Next were leased.
type SPILease struct {
	Enclave    keys.EnclaveID  `json:"enclave"`
	Peer       keys.EnclaveID  `json:"peer"`
	Server     keys.ServerID   `json:"server"`
	Generation keys.Generation `json:"generation"`
	Next       uint64          `json:"next"`
}

// LeaseSPIs leases up to count counter values of SK(i,j,k,g) and returns
// the first. Only the pair's current generation is leased (a server grants
// SAs under its current key only). Fewer than count are given when the
// space is nearly used up; none, with ErrSPIsExhausted, when it is. Marks
// of generations older than the pair's previous one are dropped: those
// keys are never accepted again.
func (s *State) LeaseSPIs(i, j keys.EnclaveID, k keys.ServerID, g keys.Generation, count uint32) (first uint64, n uint32, err error) {
	p := NewPair(i, j)
	for _, e := range []keys.EnclaveID{i, j} {
		if _, ok := s.Enclave(e); !ok { // a rule covers ids never registered: no record for them
			return 0, 0, fmt.Errorf("%w: enclave %s", ErrNotFound, s.ID(e))
		}
	}
	if !s.PairAllowed(p) {
		return 0, 0, fmt.Errorf("%w: pair %s", ErrNotAllowed, s.PairName(p))
	}
	top := s.Top(p) // a sub-pair has its level-1 pair's generations
	gs, ok := s.generation(top)
	if !ok {
		return 0, 0, fmt.Errorf("%w: pair %s has no generation", ErrNotFound, s.PairName(p))
	}
	if g != gs.Current {
		return 0, 0, fmt.Errorf("%w: generation %d of pair %s is not current (%d is)", ErrInvalid, g, s.PairName(p), gs.Current)
	}
	if count == 0 || count > MaxSPILease {
		return 0, 0, fmt.Errorf("%w: a lease is 1 to %d SPIs, not %d", ErrInvalid, MaxSPILease, count)
	}
	// This server key's marks of generations no longer accepted go (each
	// server's own go as it leases: a lease never walks the fleet's).
	var gone []string
	prefix := fmt.Sprintf("%04x-%04x-%08x-", uint16(i), uint16(j), uint32(k))
	for l := range s.SPILeases.From(prefix) {
		if !strings.HasPrefix(l.key(), prefix) {
			break
		}
		if l.Generation+1 < gs.Current {
			gone = append(gone, l.key())
		}
	}
	for _, key := range gone {
		s.SPILeases.Delete(key)
	}
	l, _ := s.SPILeases.Get(leaseKey(i, j, k, g))
	l.Enclave, l.Peer, l.Server, l.Generation = i, j, k, g
	if l.Next >= SPISpace {
		return 0, 0, fmt.Errorf("%w: SK(%d,%d,%d,%d)", ErrSPIsExhausted, i, j, k, g)
	}
	first = l.Next
	n = uint32(min(uint64(count), SPISpace-first))
	l.Next += uint64(n)
	s.SPILeases.Put(l)
	return first, n, nil
}

// leaseKey is the key SK(i,j,k,g)'s lease is kept under.
func leaseKey(i, j keys.EnclaveID, k keys.ServerID, g keys.Generation) string {
	return fmt.Sprintf("%04x-%04x-%08x-%08x", uint16(i), uint16(j), uint32(k), uint32(g))
}

func (l SPILease) key() string { return leaseKey(l.Enclave, l.Peer, l.Server, l.Generation) }

// LeasedSPIs is the high-water mark of SK(i,j,k,g): how many of its
// counter values were leased.
func (s *State) LeasedSPIs(i, j keys.EnclaveID, k keys.ServerID, g keys.Generation) uint64 {
	l, _ := s.SPILeases.Get(leaseKey(i, j, k, g))
	return l.Next
}

// RaiseSPILease makes sure no counter value of SK(i,j,k,g) below next is
// leased again: a store that is behind what was leased (restored from a
// backup, rebuilt) is brought up to the mark kept outside it. It reports
// whether the mark moved. A mark is never lowered.
func (s *State) RaiseSPILease(i, j keys.EnclaveID, k keys.ServerID, g keys.Generation, next uint64) bool {
	next = min(next, SPISpace)
	l, _ := s.SPILeases.Get(leaseKey(i, j, k, g))
	if l.Next >= next {
		return false
	}
	l.Enclave, l.Peer, l.Server, l.Generation, l.Next = i, j, k, g, next
	s.SPILeases.Put(l)
	return true
}
