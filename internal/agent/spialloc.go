package agent

import (
	"crypto/aes"
	"crypto/cipher"
	"encoding/binary"
	"errors"

	"github.com/enclavekeys/enclave/internal/kdf"
	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/registry"
)

// ErrSPIsExhausted: the key service has leased every SPI counter value
// of a server key (2³¹ of them); its pair's next rotation brings a fresh
// key.
var ErrSPIsExhausted = errors.New("agent: this server key has granted all its SPIs")

// ErrNoSPILease: the server holds no leased SPI counter values for the key
// yet (the key service has not answered); a grant waits for one.
var ErrNoSPILease = errors.New("agent: no SPIs leased from the key service for this server key yet")

// First and largest lease sizes: a key's first lease is small (a server
// that restarts often wastes little of the 2³¹), each later one twice the
// last, so that a busy server asks the key service rarely.
const (
	firstSPILease = 1 << 16
	maxSPILease   = registry.MaxSPILease
)

// spiAllocator hands out the SPI indexes of one server key. An SPI must
// never repeat under one SK (the same SPI is the same CK, and both SAs
// would count IVs from 1: the same nonces), across restarts and crashes
// of the server too, and the design's SA grant asks for random indexes.
//
// The allocator walks a counter through a permutation of the 31-bit
// indexes: the indexes look random and none repeats while the counter
// does not. The counter's values come in leases from the key service,
// which commits each range to its store before handing it out, so a value
// is used once whatever crashes (a restarted server gets a new range; the
// rest of the old one is wasted, never reused). The permutation's key is
// derived from the server key itself, so a restarted server, or a replica
// with the same identity, walks the same permutation: distinct counter
// values are distinct indexes.
//
// The permutation is a four-round Feistel network over 32 bits whose
// round function is AES under that key, restricted to indexes below 2³¹
// by cycle walking (a value at or above 2³¹ is permuted again).
//
// It is used under the agent's lock.
type spiAllocator struct {
	block     cipher.Block
	next, end uint64      // the lease in use: the next value and its end
	queued    [][2]uint64 // leases received and not yet in use, in order
	leasing   bool        // a lease request is in flight
	last      uint32      // the size of the last lease asked for
	in, out   [aes.BlockSize]byte
}

// spiPermutationLabel separates the permutation's key from every key of
// the schedule derived from SK (those use "Pv0" and "Pv1").
var spiPermutationLabel = []byte("spi-permutation")

// newSPIAllocator makes the allocator of server key sk, for the server of
// vc. It holds no lease yet.
func newSPIAllocator(sk []byte, vc keys.VC) (*spiAllocator, error) {
	var ctx [8]byte
	binary.BigEndian.PutUint16(ctx[0:], uint16(vc.Enclave))
	binary.BigEndian.PutUint16(ctx[2:], uint16(vc.Peer))
	binary.BigEndian.PutUint32(ctx[4:], uint32(vc.Server))
	k, err := kdf.Derive(sk, spiPermutationLabel, ctx[:], 128)
	if err != nil {
		return nil, err
	}
	b, err := aes.NewCipher(k)
	clear(k)
	if err != nil {
		return nil, err
	}
	return &spiAllocator{block: b}, nil
}

// add takes a lease of counter values [first, first+n).
func (s *spiAllocator) add(first uint64, n uint32) {
	s.queued = append(s.queued, [2]uint64{first, first + uint64(n)})
}

// left is how many leased counter values are not used yet.
func (s *spiAllocator) left() uint64 {
	n := s.end - s.next
	for _, q := range s.queued {
		n += q[1] - q[0]
	}
	return n
}

// wantLease reports whether a lease should be asked for now, and of what
// size: when none is in flight and less than half the last one is left.
// It marks the request as in flight; the caller reports the answer with
// add or leaseFailed.
func (s *spiAllocator) wantLease() (uint32, bool) {
	if s.leasing || (s.last > 0 && s.left() >= uint64(s.last/2)) {
		return 0, false
	}
	size := uint32(firstSPILease)
	if s.last > 0 {
		size = min(2*s.last, maxSPILease)
	}
	s.last, s.leasing = size, true
	return size, true
}

// leaseDone ends the request in flight; a failed one is asked again at
// the same size.
func (s *spiAllocator) leaseDone(ok bool) {
	s.leasing = false
	if !ok {
		if s.last <= firstSPILease {
			s.last = 0
		} else {
			s.last /= 2
		}
	}
}

// index returns the next SPI index: never 0, never one returned before
// under this key by any allocator (its counter values are leased once).
func (s *spiAllocator) index() (uint32, error) {
	for {
		for s.next < s.end {
			x := s.permute(uint32(s.next))
			s.next++
			if x != 0 {
				return x, nil
			}
		}
		if len(s.queued) == 0 {
			return 0, ErrNoSPILease
		}
		s.next, s.end = s.queued[0][0], min(s.queued[0][1], registry.SPISpace)
		s.queued = s.queued[1:]
	}
}

// permute maps x < 2³¹ to a value < 2³¹, one to one.
func (s *spiAllocator) permute(x uint32) uint32 {
	for {
		x = s.feistel(x)
		if x <= keys.MaxSPIIndex {
			return x
		}
	}
}

// feistel is a permutation of the 32-bit values: four rounds over 16-bit
// halves.
func (s *spiAllocator) feistel(x uint32) uint32 {
	l, r := uint16(x>>16), uint16(x)
	for round := range byte(4) {
		s.in[0] = round
		binary.BigEndian.PutUint16(s.in[1:], r)
		s.block.Encrypt(s.out[:], s.in[:])
		l, r = r, l^binary.BigEndian.Uint16(s.out[:])
	}
	return uint32(l)<<16 | uint32(r)
}
