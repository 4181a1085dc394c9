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
	var buf [inlineInput]byte
	var msg []byte
	if n := 4 + len(label) + 1 + len(context) + 4; n <= len(buf) {
		msg = buf[:n]
	} else {
		msg = make([]byte, n)
	}
	copy(msg[4:], label)
	msg[4+len(label)] = 0x00
	copy(msg[5+len(label):], context)
	return p.counterMode(out, msg)
}

// DeriveFixed fills out using fixed as the whole input after the counter:
// T(n) = CMAC(K, [n]32 || fixed). It is the general SP 800-108 form, in which
// the caller encodes Label, the separator, Context and [L]32 itself.
func (p *PRF) DeriveFixed(out, fixed []byte) error {
	var buf [inlineInput]byte
	var msg []byte
	if n := 4 + len(fixed); n <= len(buf) {
		msg = buf[:n]
	} else {
		msg = make([]byte, n)
	}
	copy(msg[4:], fixed)
	return p.counterModeRaw(out, msg)
}

// counterMode writes [L]32 into the last four bytes of msg, then runs the
// counter loop.
func (p *PRF) counterMode(out, msg []byte) error {
	if len(out) == 0 || len(out) > MaxOutput {
		return ErrOutputSize
	}
	binary.BigEndian.PutUint32(msg[len(msg)-4:], uint32(len(out))*8)
	return p.counterModeRaw(out, msg)
}

// counterModeRaw runs T(n) = CMAC(K, [n]32 || msg[4:]) for n = 1, 2, ...
// and writes the first len(out) bytes of their concatenation to out.
func (p *PRF) counterModeRaw(out, msg []byte) error {
	if !p.ready {
		return ErrNoKey
	}
	if len(out) == 0 || len(out) > MaxOutput {
		return ErrOutputSize
	}
	var t [cmac.Size]byte
	for n := uint32(1); len(out) > 0; n++ {
		binary.BigEndian.PutUint32(msg[:4], n)
		p.mac.Sum(&t, msg)
		out = out[copy(out, t[:]):]
	}
	clear(t[:])
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
