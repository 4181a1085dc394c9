package packet

import (
	"crypto/aes"
	"crypto/cipher"
	"unsafe"

	"github.com/enclavekeys/enclave/internal/keys"
)

// AEAD is an SA key made ready for sealing and opening: AES-GCM from
// crypto/cipher (12-byte nonce, 16-byte tag) over crypto/aes, with the PSP
// version whose key length it has. Preparing one allocates (the AES key
// schedule and GCM's tables live on the heap); using it does not. The zero
// value holds no key. An AEAD is safe for concurrent Seal and Open once
// Init has returned.
type AEAD struct {
	gcm     cipher.AEAD
	version keys.Version
}

// NewAEAD prepares key for PSP version v.
func NewAEAD(v keys.Version, key []byte) (*AEAD, error) {
	a := new(AEAD)
	if err := a.Init(v, key); err != nil {
		return nil, err
	}
	return a, nil
}

// Init prepares key for PSP version v in a: 16 bytes (AES-128-GCM) for
// PSPv0, 32 (AES-256-GCM) for PSPv1. On error a holds no key.
func (a *AEAD) Init(v keys.Version, key []byte) error {
	*a = AEAD{}
	if !v.Valid() {
		return ErrVersion
	}
	if len(key) != v.KeySize() {
		return ErrKeyLength
	}
	b, err := aes.NewCipher(key)
	if err != nil {
		return err
	}
	g, err := cipher.NewGCM(b)
	if err != nil {
		return err
	}
	a.gcm, a.version = g, v
	return nil
}

// Ready reports whether a holds a key.
func (a *AEAD) Ready() bool { return a != nil && a.gcm != nil }

// Version is the PSP version a's key is for (meaningful when Ready).
func (a *AEAD) Version() keys.Version { return a.version }

// Reset drops the key. crypto/aes offers no way to wipe its key schedule;
// once no AEAD refers to it, it is garbage.
func (a *AEAD) Reset() { *a = AEAD{} }

// overlaps reports whether a and b share at least one byte of memory.
func overlaps(a, b []byte) bool {
	if len(a) == 0 || len(b) == 0 {
		return false
	}
	pa := uintptr(unsafe.Pointer(unsafe.SliceData(a)))
	pb := uintptr(unsafe.Pointer(unsafe.SliceData(b)))
	return pa < pb+uintptr(len(b)) && pb < pa+uintptr(len(a))
}

// shifted reports whether out and in overlap other than by starting at the
// same byte: in-place encryption and decryption work only on exact
// overlap, and crypto/cipher panics on the rest, so it is refused first.
func shifted(out, in []byte) bool {
	return overlaps(out, in) && unsafe.SliceData(out) != unsafe.SliceData(in)
}

// growth returns the n bytes that appending n bytes to dst would write:
// dst's spare capacity when it has enough (where crypto/cipher writes), or
// nil when it would allocate a fresh slice, which overlaps nothing.
func growth(dst []byte, n int) []byte {
	if cap(dst)-len(dst) < n {
		return nil
	}
	return dst[len(dst) : len(dst)+n]
}
