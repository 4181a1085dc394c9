package packet

import "unsafe"

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

// Open authenticates p under key and decrypts it, appending its payload
// to dst: the inner IP packet in tunnel mode, the transport's payload
// (its header and data) in transport mode. The payload is the clear bytes
// after the PSP header and its extensions (those a crypt offset beyond
// them leaves in the clear, authenticated) followed by the decrypted
// rest; a VC the crypt offset encrypts is not part of it. Pass
// p.Sealed[:0] as dst to open in place (no copy, no allocation): the
// payload is returned where it lies in the packet. On failure the bytes
// written are zeroed. A wrong key or any change to an authenticated byte
// gives ErrAuth. The nonce is read from the packet's own header bytes
// (p.AAD[4:16]).
func Open(dst []byte, p *Parsed, key *AEAD) ([]byte, error) {
	if !key.Ready() || key.version != p.Version {
		return nil, ErrKeyLength
	}
	if len(p.AAD) < PSPHeaderLen || len(p.Sealed) < TagLen || p.HdrLen < PSPHeaderLen {
		return nil, ErrShort
	}
	clearEnd := len(p.AAD)
	nonce := p.AAD[4:PSPHeaderLen]
	if len(dst) == 0 && cap(dst) >= len(p.Sealed)-TagLen && unsafe.SliceData(dst) == unsafe.SliceData(p.Sealed) {
		if cap(p.AAD) < clearEnd+len(p.Sealed) || !sameByte(p.AAD[clearEnd:clearEnd+1], p.Sealed) {
			return nil, ErrBuffer // AAD and Sealed are not one packet
		}
		plain, err := key.gcm.Open(dst, nonce, p.Sealed, p.AAD)
		if err != nil {
			clear(dst[:len(p.Sealed)-TagLen])
			return nil, ErrAuth
		}
		if clearEnd >= p.HdrLen {
			// The clear part of the payload lies just before the
			// decrypted rest: one slice of the packet.
			return p.AAD[p.HdrLen : clearEnd+len(plain)], nil
		}
		return plain[p.HdrLen-clearEnd:], nil
	}
	start := len(dst)
	pre := max(clearEnd-p.HdrLen, 0)
	if all := growth(dst, pre+len(p.Sealed)-TagLen); all != nil && (overlaps(all[:pre], p.AAD[:p.HdrLen]) || overlaps(all[:pre], p.Sealed) ||
		shifted(all[pre:], p.Sealed) || overlaps(all[pre:], p.AAD)) {
		return nil, ErrBuffer
	}
	if pre > 0 {
		dst = append(dst, p.AAD[p.HdrLen:]...)
	}
	out := growth(dst, len(p.Sealed)-TagLen)
	plain, err := key.gcm.Open(dst, nonce, p.Sealed, p.AAD)
	if err != nil {
		clear(out)
		clear(dst[start:])
		return nil, ErrAuth
	}
	if clearEnd < p.HdrLen {
		// The crypt offset encrypted part of the header extensions (the
		// VC): it is not payload.
		skip := p.HdrLen - clearEnd
		n := copy(plain[start:], plain[start+skip:])
		plain = plain[:start+n]
	}
	return plain, nil
}

// PSPForm is how SealPSP lays a packet out, beyond what Enclave's own
// packets are (tunnel mode, a VC, crypt offset 2): the forms other PSP
// senders use, so that tools and tests can make them.
type PSPForm struct {
	// NoVC leaves the VC out (V bit clear, hdr ext len 1).
	NoVC bool
	// CryptOffset, in 4-octet units after the 16-byte PSP header (0 to
	// 63), is how much stays in the clear, authenticated: below the
	// VC's end (2) part or all of the VC is encrypted.
	CryptOffset uint8
}

// SealPSP seals payload (an IP packet in tunnel mode, next header 4 or
// 41; a transport's header and data in transport mode, next header its
// protocol) under key into out in the form f and returns the packet. The
// VC, when there is one, may hold any value. out must not overlap
// payload.
func SealPSP(out []byte, h *Header, f PSPForm, key *AEAD, payload []byte) ([]byte, error) {
	if len(payload) > MaxInner {
		return nil, ErrTooLong
	}
	hdr := HeaderLen
	if f.NoVC {
		hdr = PSPHeaderLen
	}
	n := hdr + len(payload) + TagLen
	clearEnd := PSPHeaderLen + 4*int(f.CryptOffset)
	switch {
	case f.CryptOffset > 0x3f || clearEnd > hdr+len(payload):
		return nil, ErrCryptOffset
	case len(out) < n:
		return nil, ErrBuffer
	case h.IV == 0:
		return nil, ErrIVZero
	case !h.Version.Valid():
		return nil, ErrVersion
	case !h.SPI.Valid():
		return nil, ErrSPIIndexZero
	case !key.Ready() || key.version != h.Version:
		return nil, ErrKeyLength
	case overlaps(out[:n], payload):
		return nil, ErrBuffer
	}
	h.put(out, !f.NoVC, f.CryptOffset)
	copy(out[hdr:], payload)
	key.gcm.Seal(out[clearEnd:clearEnd], out[4:PSPHeaderLen], out[clearEnd:hdr+len(payload)], out[:clearEnd])
	return out[:n], nil
}

// sameByte reports whether a and b start at the same byte.
func sameByte(a, b []byte) bool { return unsafe.SliceData(a) == unsafe.SliceData(b) }
