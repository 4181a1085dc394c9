// Package cmac implements AES-CMAC (NIST SP 800-38B, RFC 4493) for 128-, 192-
// and 256-bit keys.
//
// The Go standard library has no public CMAC. This one computes the subkeys
// once in Init, and then each MAC costs no allocation, which the key
// hierarchy needs: it runs CMAC on every packet it derives a key for.
package cmac

import (
	"crypto/subtle"
	"encoding/binary"
	"errors"

	"github.com/enclavekeys/enclave/internal/fastaes"
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

// CMAC is an AES-CMAC key with its subkeys. The zero value is unusable until
// Init succeeds. It is safe for concurrent use once initialised.
type CMAC struct {
	block  fastaes.Block
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

// Init (re-)keys c in place without allocating. The error, if any, is a
// fastaes.KeySizeError.
func (c *CMAC) Init(key []byte) error {
	if err := c.block.Init(key); err != nil {
		c.Reset()
		return err
	}
	// Subkeys (SP 800-38B section 6.1): L = E(K, 0^128), K1 = L·x, K2 = K1·x
	// in GF(2^128), doubling being a shift with a conditional reduction by
	// 0x87 done without a branch on secret data.
	var l [Size]byte
	c.block.Encrypt(&l, &l)
	double(&c.k1, &l)
	double(&c.k2, &c.k1)
	return nil
}

// Reset zeroes the key material in c.
func (c *CMAC) Reset() {
	*c = CMAC{}
}

func double(dst, src *[Size]byte) {
	hi := binary.BigEndian.Uint64(src[:8])
	lo := binary.BigEndian.Uint64(src[8:])
	// -(hi>>63) is all ones when the top bit is set: the 0x87 reduction is
	// masked in without a branch on secret data.
	carry := -(hi >> 63) & 0x87
	binary.BigEndian.PutUint64(dst[:8], hi<<1|lo>>63)
	binary.BigEndian.PutUint64(dst[8:], lo<<1^carry)
}

// Sum computes the full 16-byte tag of msg into tag. It does not allocate.
func (c *CMAC) Sum(tag *[Size]byte, msg []byte) {
	var x [Size]byte
	// All blocks but the last are chained through CBC: x = E(x ^ m).
	for len(msg) > Size {
		c.block.EncryptXOR3(&x, &x, (*[Size]byte)(msg), &zero)
		msg = msg[Size:]
	}
	// The last block: complete, XOR K1; partial or empty, pad 10* and XOR K2.
	if len(msg) == Size {
		c.block.EncryptXOR3(tag, &x, (*[Size]byte)(msg), &c.k1)
		return
	}
	var last [Size]byte
	copy(last[:], msg)
	last[len(msg)] = 0x80
	c.block.EncryptXOR3(tag, &x, &last, &c.k2)
}

// Sum2 computes the tags of two messages of equal length together, their
// blocks interleaved so that they share the AES pipeline: about the time of
// one Sum. Messages of different lengths are done one after the other.
func (c *CMAC) Sum2(tag1, tag2 *[Size]byte, msg1, msg2 []byte) {
	if len(msg1) != len(msg2) {
		c.Sum(tag1, msg1)
		c.Sum(tag2, msg2)
		return
	}
	var x1, x2 [Size]byte
	for len(msg1) > Size {
		c.block.EncryptXOR3x2(&x1, &x1, (*[Size]byte)(msg1), &zero, &x2, &x2, (*[Size]byte)(msg2), &zero)
		msg1, msg2 = msg1[Size:], msg2[Size:]
	}
	if len(msg1) == Size {
		c.block.EncryptXOR3x2(tag1, &x1, (*[Size]byte)(msg1), &c.k1, tag2, &x2, (*[Size]byte)(msg2), &c.k1)
		return
	}
	var last1, last2 [Size]byte
	copy(last1[:], msg1)
	copy(last2[:], msg2)
	last1[len(msg1)], last2[len(msg2)] = 0x80, 0x80
	c.block.EncryptXOR3x2(tag1, &x1, &last1, &c.k2, tag2, &x2, &last2, &c.k2)
}

// zero is the all-zero block, the third operand of a plain CBC step.
var zero [Size]byte

// Verify checks tag against msg in constant time. A tag may be truncated to
// between MinTagSize and Size bytes; then its leading bytes are compared.
// It returns nil, ErrNoKey, ErrTagSize or ErrMismatch.
func (c *CMAC) Verify(msg, tag []byte) error {
	if !c.block.Ready() {
		return ErrNoKey
	}
	if len(tag) < MinTagSize || len(tag) > Size {
		return ErrTagSize
	}
	var want [Size]byte
	c.Sum(&want, msg)
	if subtle.ConstantTimeCompare(want[:len(tag)], tag) != 1 {
		return ErrMismatch
	}
	return nil
}
