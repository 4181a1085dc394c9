package agent

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/binary"
	"errors"

	"github.com/enclavekeys/enclave/internal/keys"
)

// ErrSPIsExhausted: a server key has granted every SPI index it has (2³¹
// of them); its pair's next rotation brings a fresh key.
var ErrSPIsExhausted = errors.New("agent: this server key has granted all its SPIs")

// spiAllocator hands out the SPI indexes of one server key. An SPI must
// never repeat under one SK (the same SPI is the same CK, and both SAs
// would count IVs from 1: the same nonces), and the design's SA grant asks
// for random indexes. Remembering every index granted would grow with every
// handshake for as long as the key is held (a server making 100 SAs a
// second would keep 17 million a day). Instead the allocator walks a
// counter through a random permutation of the 31-bit indexes: the indexes
// look random, none repeats until all 2³¹ are used, and its state is a
// key and a counter.
//
// The permutation is a four-round Feistel network over 32 bits whose
// round function is AES under a random key, restricted to indexes below
// 2³¹ by cycle walking (a value at or above 2³¹ is permuted again).
//
// It is used under the agent's lock.
type spiAllocator struct {
	block   cipher.Block
	next    uint64              // how many counter values were used
	in, out [aes.BlockSize]byte // the round function's blocks, kept here so that a grant does not allocate them
}

func newSPIAllocator() *spiAllocator {
	var k [16]byte
	rand.Read(k[:])
	b, _ := aes.NewCipher(k[:]) // a 16-byte key is always accepted
	clear(k[:])
	return &spiAllocator{block: b}
}

// index returns the next SPI index: never 0, never one returned before.
func (s *spiAllocator) index() (uint32, error) {
	for s.next <= keys.MaxSPIIndex {
		x := s.permute(uint32(s.next))
		s.next++
		if x != 0 {
			return x, nil
		}
	}
	return 0, ErrSPIsExhausted
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
