// Package kdf implements the key-derivation function of the Enclave key
// schedule: NIST SP 800-108r1 KDF in counter mode with PRF = AES-256-CMAC and
// a 32-bit counter placed before the fixed input (DESIGN §3):
//
//	KDF(K, Label, Context, L) = first L bits of T(1) || T(2) || ...
//	T(n) = AES256-CMAC(K, [n]32 || Label || 0x00 || Context || [L]32)
//
// This is OpenSSL 3's KBKDF with mac CMAC, cipher AES-256-CBC, salt = Label
// and info = Context, and the SA-key derivation of Google's PSP.
package kdf

import (
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/enclavekeys/enclave/internal/cmac"
)

// KeySize is the length of a KDF key in bytes (an AES-256 key).
const KeySize = 32

// MaxOutput is the largest output Derive produces, in bytes. It keeps L (in
// bits) within the 32-bit field the KDF encodes it in.
const MaxOutput = 1<<29 - 1

// ErrKeySize is returned for a key that is not KeySize bytes long.
var ErrKeySize = errors.New("kdf: key must be 32 bytes (AES-256-CMAC)")

// ErrOutputSize is returned for an output of zero bytes or more than
// MaxOutput bytes.
var ErrOutputSize = errors.New("kdf: output length out of range")

// ErrNoKey is returned by a PRF that was never successfully initialised.
var ErrNoKey = errors.New("kdf: no key")

// PRF is a KDF key prepared for repeated derivations: its AES key schedule
// and CMAC subkeys are computed once. The zero value has no key; Init sets
// one in place without allocating. A PRF is safe for concurrent use once
// initialised.
type PRF struct {
	mac   cmac.CMAC
	ready bool
}

// Init (re-)keys p with key, which must be KeySize bytes long.
func (p *PRF) Init(key []byte) error {
	if len(key) != KeySize {
		p.Reset()
		return fmt.Errorf("%w: got %d bytes", ErrKeySize, len(key))
	}
	if err := p.mac.Init(key); err != nil {
		p.Reset()
		return err
	}
	p.ready = true
	return nil
}

// Reset zeroes the key material in p.
func (p *PRF) Reset() {
	*p = PRF{}
}

// inlineInput is the fixed-input size that Derive handles without
// allocating; every label and context of the Enclave key schedule fits.
const inlineInput = 96

// Derive fills out with KDF(K, label, context, 8*len(out)). It does not
// allocate when 9+len(label)+len(context) is at most 96 bytes.
func (p *PRF) Derive(out, label, context []byte) error {
	if len(out) == 0 || len(out) > MaxOutput {
		return ErrOutputSize
	}
	var b1, b2 [inlineInput]byte
	m1, m2 := messages(&b1, &b2, 4+len(label)+1+len(context)+4, len(out))
	for _, m := range [2][]byte{m1, m2} {
		if m == nil {
			continue
		}
		// Written in place rather than copied from m1: a wide copy of
		// freshly written small fields would stall on store forwarding.
		copy(m[4:], label)
		m[4+len(label)] = 0x00
		copy(m[5+len(label):], context)
		binary.BigEndian.PutUint32(m[len(m)-4:], uint32(len(out))*8)
	}
	return p.counterMode(out, m1, m2)
}

// DeriveFixed fills out using fixed as the whole input after the counter:
// T(n) = CMAC(K, [n]32 || fixed). It is the general SP 800-108 form, in which
// the caller encodes Label, the separator, Context and [L]32 itself.
func (p *PRF) DeriveFixed(out, fixed []byte) error {
	if len(out) == 0 || len(out) > MaxOutput {
		return ErrOutputSize
	}
	var b1, b2 [inlineInput]byte
	m1, m2 := messages(&b1, &b2, 4+len(fixed), len(out))
	copy(m1[4:], fixed)
	if m2 != nil {
		copy(m2[4:], fixed)
	}
	return p.counterMode(out, m1, m2)
}

// messages returns the buffers for [n]32 || fixed input: on the stack when
// they fit, and a second one only when the output needs more than one T(n).
func messages(b1, b2 *[inlineInput]byte, n, outLen int) (m1, m2 []byte) {
	if n <= inlineInput {
		m1 = b1[:n]
	} else {
		m1 = make([]byte, n)
	}
	if outLen > cmac.Size {
		if n <= inlineInput {
			m2 = b2[:n]
		} else {
			m2 = make([]byte, n)
		}
	}
	return m1, m2
}

// counterMode runs T(n) = CMAC(K, [n]32 || m[4:]) for n = 1, 2, ... and
// writes the first len(out) bytes of their concatenation to out. Each full
// T is computed in place in out (the CMAC's working block must be memory
// the caller keeps, not this frame's: see cmac.Sum), two at a time with
// cmac.Sum2 (m1 for odd and m2 for even counters) so that their AES calls
// overlap. Only a final partial block needs a scratch block of its own,
// which allocates; no key of the schedule has one. m2 is nil when out needs
// a single T.
func (p *PRF) counterMode(out, m1, m2 []byte) error {
	if !p.ready {
		return ErrNoKey
	}
	n := uint32(1)
	for ; len(out) >= 2*cmac.Size; n += 2 {
		binary.BigEndian.PutUint32(m1[:4], n)
		binary.BigEndian.PutUint32(m2[:4], n+1)
		p.mac.Sum2((*[cmac.Size]byte)(out), (*[cmac.Size]byte)(out[cmac.Size:]), m1, m2)
		out = out[2*cmac.Size:]
	}
	if len(out) >= cmac.Size {
		binary.BigEndian.PutUint32(m1[:4], n)
		p.mac.Sum((*[cmac.Size]byte)(out), m1)
		out = out[cmac.Size:]
		n++ // only a partial block can follow, and it is the last
	}
	if len(out) > 0 {
		binary.BigEndian.PutUint32(m1[:4], n)
		t := new([cmac.Size]byte)
		p.mac.Sum(t, m1)
		copy(out, t[:])
		clear(t[:])
	}
	return nil
}

// Derive is KDF(key, label, context, bits) for a one-off derivation. bits
// must be a positive multiple of 8.
func Derive(key, label, context []byte, bits int) ([]byte, error) {
	if bits <= 0 || bits%8 != 0 || bits/8 > MaxOutput {
		return nil, fmt.Errorf("%w: L = %d bits (want a positive multiple of 8)", ErrOutputSize, bits)
	}
	var p PRF
	if err := p.Init(key); err != nil {
		return nil, err
	}
	defer p.Reset()
	out := make([]byte, bits/8)
	if err := p.Derive(out, label, context); err != nil {
		return nil, err
	}
	return out, nil
}
