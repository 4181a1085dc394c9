package packet

// MaxInner is the largest inner packet: an IPv6 jumbogram is not carried,
// and nothing else exceeds 65535 bytes.
const MaxInner = 65535

// Seal writes the packet carrying inner under key into out and returns
// out[:Overhead+len(inner)]. h gives the header fields (its CryptOffset is
// ignored: Enclave always sends 2). inner may already sit at
// out[HeaderLen:] (sealing in place, no copy); it must not overlap the
// header bytes otherwise. key must be prepared for h.Version. The nonce
// (SPI || IV) and the additional data are read from the header just
// written into out, so Seal does not allocate.
func Seal(out []byte, h *Header, key *AEAD, inner []byte) ([]byte, error) {
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
	if !key.Ready() || key.version != h.Version {
		return nil, ErrKeyLength
	}
	if overlaps(out[:HeaderLen], inner) || shifted(out[HeaderLen:n], inner) {
		return nil, ErrBuffer
	}
	if err := h.Put(out); err != nil {
		return nil, err
	}
	key.gcm.Seal(out[HeaderLen:HeaderLen], out[4:PSPHeaderLen], inner, out[:HeaderLen])
	return out[:n], nil
}

// Open authenticates p under key and decrypts its inner packet, appending it
// to dst. Pass p.Sealed[:0] as dst to decrypt in place (no copy, no
// allocation); on failure the bytes written are zeroed. A wrong key or any
// change to an authenticated byte gives ErrAuth. The nonce is read from the
// packet's own header bytes (p.AAD[4:16]).
func Open(dst []byte, p *Parsed, key *AEAD) ([]byte, error) {
	if !key.Ready() || key.version != p.Version {
		return nil, ErrKeyLength
	}
	if len(p.AAD) < PSPHeaderLen || len(p.Sealed) < TagLen {
		return nil, ErrShort
	}
	out := growth(dst, len(p.Sealed)-TagLen)
	if shifted(out, p.Sealed) || overlaps(out, p.AAD) {
		return nil, ErrBuffer
	}
	inner, err := key.gcm.Open(dst, p.AAD[4:PSPHeaderLen], p.Sealed, p.AAD)
	if err != nil {
		clear(out)
		return nil, ErrAuth
	}
	return inner, nil
}
