// Package cmac implements AES-CMAC (NIST SP 800-38B, RFC 4493) for 128-, 192-
// and 256-bit keys, on the AES of crypto/aes.
//
// The Go standard library has no public CMAC. This one computes the AES key
// schedule and the subkeys once in Init; after that a MAC costs only its
// block encryptions and no allocation, which the key hierarchy needs: it runs
// CMAC for every SA key it derives.
package cmac

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/subtle"
	"encoding/binary"
	"errors"
)

// Size is the length of a full CMAC tag in bytes.
const Size = 16

// MinTagSize is the shortest truncated tag Verify accepts (64 bits, the
// lower bound SP 800-38B section A.2 recommends).
const MinTagSize = 8

// ErrTagSize is returned by Verify for a tag shorter than MinTagSize or
// longer than Size.
var ErrTagSize = errors.New("cmac: tag length out of range")

// ErrNoKey is returned by Verify on a CMAC that was never successfully
// initialised, so that a zero value never accepts a tag.
var ErrNoKey = errors.New("cmac: no key")

// ErrMismatch is returned by Verify when the tag is wrong.
var ErrMismatch = errors.New("cmac: tag mismatch")

// CMAC is an AES-CMAC key: its AES block cipher and its two subkeys. The zero
// value is unusable until Init succeeds. It is safe for concurrent use once
// initialised.
type CMAC struct {
	block  cipher.Block
	k1, k2 [Size]byte
}

// New returns a CMAC for key, which must be 16, 24 or 32 bytes long.
func New(key []byte) (*CMAC, error) {
	c := new(CMAC)
	if err := c.Init(key); err != nil {
		return nil, err
	}
	return c, nil
}

// Init (re-)keys c. The error, if any, is an aes.KeySizeError. Init
// allocates the AES key schedule (crypto/aes keeps it on the heap); every
// MAC afterwards is free of allocation.
func (c *CMAC) Init(key []byte) error {
	c.Reset()
	b, err := aes.NewCipher(key)
	if err != nil {
		return err
	}
	c.block = b
	// Subkeys (SP 800-38B section 6.1): L = E(K, 0^128), K1 = L·x, K2 = K1·x
	// in GF(2^128). L is computed in k1, which lives wherever c does: a
	// buffer handed to the block cipher's interface method escapes, and c is
	// already the caller's.
	c.block.Encrypt(c.k1[:], c.k1[:])
	double(&c.k1, &c.k1)
	double(&c.k2, &c.k1)
	return nil
}

// Ready reports whether Init has succeeded on c.
func (c *CMAC) Ready() bool { return c.block != nil }

// Reset zeroes the subkeys and drops the AES key schedule. (crypto/aes gives
// no way to wipe its copy; it is left to the garbage collector.)
func (c *CMAC) Reset() {
	*c = CMAC{}
}

// double sets dst = src·x in GF(2^128): a one-bit left shift and, when the
// top bit falls out, a reduction by x^7+x^2+x+1 (0x87), applied through a
// mask so that no branch depends on the secret value.
func double(dst, src *[Size]byte) {
	hi := binary.BigEndian.Uint64(src[:8])
	lo := binary.BigEndian.Uint64(src[8:])
	mask := -(hi >> 63)
	binary.BigEndian.PutUint64(dst[:8], hi<<1|lo>>63)
	binary.BigEndian.PutUint64(dst[8:], lo<<1^(mask&0x87))
}

// xorInto sets x ^= a, a word at a time.
func xorInto(x *[Size]byte, a []byte) {
	binary.NativeEndian.PutUint64(x[:8], binary.NativeEndian.Uint64(x[:8])^binary.NativeEndian.Uint64(a[:8]))
	binary.NativeEndian.PutUint64(x[8:], binary.NativeEndian.Uint64(x[8:])^binary.NativeEndian.Uint64(a[8:16]))
}

// Sum computes the full 16-byte tag of msg into tag. tag is also the
// working block: it is handed to the block cipher, so to stay free of
// allocation it must be memory the caller already keeps off the stack (a
// field of a heap value, a slice of a buffer). On a CMAC without a key the
// tag is all zeros.
func (c *CMAC) Sum(tag *[Size]byte, msg []byte) {
	*tag = [Size]byte{}
	if c.block == nil {
		return
	}
	c.chain(tag, msg)
	c.finish(tag, msg[len(msg)-tail(len(msg)):])
}

// tail is the length of the last block of an n-byte message: 16 for a
// non-empty multiple of 16, n mod 16 otherwise (0 only for n = 0).
func tail(n int) int {
	if n > 0 && n%Size == 0 {
		return Size
	}
	return n % Size
}

// chain runs the CBC part over every block but the last: x = E(x ^ m_i).
func (c *CMAC) chain(x *[Size]byte, msg []byte) {
	for n := len(msg) - tail(len(msg)); n > 0; n -= Size {
		xorInto(x, msg[:Size])
		c.block.Encrypt(x[:], x[:])
		msg = msg[Size:]
	}
}

// finish processes the last block: a complete one is masked with K1; a
// partial or empty one is padded with 10* and masked with K2.
func (c *CMAC) finish(x *[Size]byte, last []byte) {
	if len(last) == Size {
		xorInto(x, last)
		xorInto(x, c.k1[:])
	} else {
		var pad [Size]byte
		copy(pad[:], last)
		pad[len(last)] = 0x80
		xorInto(x, pad[:])
		xorInto(x, c.k2[:])
	}
	c.block.Encrypt(x[:], x[:])
}

// Sum2 computes the tags of two messages, alternating their block
// encryptions: the two chains do not depend on each other, so the
// processor can overlap one chain's AES rounds with the other's. The same
// rule as for Sum holds for where tag1 and tag2 live.
func (c *CMAC) Sum2(tag1, tag2 *[Size]byte, msg1, msg2 []byte) {
	if len(msg1) != len(msg2) || c.block == nil {
		c.Sum(tag1, msg1)
		c.Sum(tag2, msg2)
		return
	}
	*tag1, *tag2 = [Size]byte{}, [Size]byte{}
	for n := len(msg1) - tail(len(msg1)); n > 0; n -= Size {
		xorInto(tag1, msg1[:Size])
		xorInto(tag2, msg2[:Size])
		c.block.Encrypt(tag1[:], tag1[:])
		c.block.Encrypt(tag2[:], tag2[:])
		msg1, msg2 = msg1[Size:], msg2[Size:]
	}
	c.finish(tag1, msg1)
	c.finish(tag2, msg2)
}

// Verify checks tag against msg in constant time. A tag may be truncated to
// between MinTagSize and Size bytes; then its leading bytes are compared.
// It returns nil, ErrNoKey, ErrTagSize or ErrMismatch.
func (c *CMAC) Verify(msg, tag []byte) error {
	if c.block == nil {
		return ErrNoKey
	}
	if len(tag) < MinTagSize || len(tag) > Size {
		return ErrTagSize
	}
	want := new([Size]byte)
	c.Sum(want, msg)
	if subtle.ConstantTimeCompare(want[:len(tag)], tag) != 1 {
		return ErrMismatch
	}
	return nil
}
