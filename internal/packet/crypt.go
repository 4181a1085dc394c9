package packet

import (
	"github.com/enclavekeys/enclave/internal/alias"
	"github.com/enclavekeys/enclave/internal/fastaes"
)

// MaxInner is the largest inner packet: an IPv6 jumbogram is not carried,
// and nothing else exceeds 65535 bytes.
const MaxInner = 65535

// Seal writes the packet carrying inner under key into out and returns
// out[:Overhead+len(inner)]. h gives the header fields (its CryptOffset is
// ignored: Enclave always sends 2). inner may already sit at
// out[HeaderLen:] (sealing in place, no copy); it must not overlap the
// header bytes otherwise. key must be 16 bytes for PSPv0 and 32 for PSPv1.
// Seal does not allocate.
func Seal(out []byte, h *Header, key *fastaes.GCM, inner []byte) ([]byte, error) {
	if len(inner) > MaxInner {
		return nil, ErrTooLong
	}
	n := Overhead + len(inner)
	if len(out) < n {
		return nil, ErrBuffer
	}
	if h.IV == 0 {
		return nil, ErrIVZero
	}
	if key.KeySize() != h.Version.KeySize() {
		return nil, ErrKeyLength
	}
	if alias.AnyOverlap(out[:HeaderLen], inner) || alias.InexactOverlap(out[HeaderLen:], inner) {
		return nil, ErrBuffer
	}
	if err := h.Put(out); err != nil {
		return nil, err
	}
	nonce := h.Nonce()
	if _, err := key.Seal(out[HeaderLen:HeaderLen], nonce[:], inner, out[:HeaderLen]); err != nil {
		return nil, err
	}
	return out[:n], nil
}

// Open authenticates p under key and decrypts its inner packet, appending it
// to dst. Pass p.Sealed[:0] as dst to decrypt in place (no copy, no
// allocation); on failure those bytes are zeroed. A wrong key or any change
// to an authenticated byte gives ErrAuth.
func Open(dst []byte, p *Parsed, key *fastaes.GCM) ([]byte, error) {
	if key.KeySize() != p.Version.KeySize() {
		return nil, ErrKeyLength
	}
	nonce := p.Nonce()
	inner, err := key.Open(dst, nonce[:], p.Sealed, p.AAD)
	if err == fastaes.ErrOpen {
		return nil, ErrAuth
	}
	return inner, err
}
