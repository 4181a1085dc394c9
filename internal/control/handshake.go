package control

import (
	"crypto/sha256"
	"encoding/binary"
)

// Initiation is a parsed Initiation message (type 1). Its slices alias the
// datagram.
type Initiation struct {
	Sender uint32
	// Noise is noise message 1 (e, s and the initiator payload).
	Noise []byte
	// MAC2 is the cookie MAC (all zeros without a cookie).
	MAC2 [MACLen]byte
	// Authenticated is every byte mac2 covers: header to the end of Noise.
	Authenticated []byte
	// Path is the path record after mac2.
	Path PathRecord
	// PathBytes are the path record's raw bytes (for appending entries).
	PathBytes []byte
}

// AppendInitiation appends an Initiation with no path record and a zero
// mac2 to dst; SetMAC2 fills mac2 afterwards. It returns the message and
// the offset of mac2 in it.
func AppendInitiation(dst []byte, sender uint32, noise []byte) ([]byte, int, error) {
	if sender == 0 {
		return nil, 0, ErrIndex
	}
	if len(noise) > MaxMessage-HeaderLen-2-MACLen-1 {
		return nil, 0, ErrLong
	}
	start := len(dst)
	dst = append(dst, make([]byte, HeaderLen)...)
	Header{Type: TypeInitiation, Sender: sender}.put(dst[start:])
	dst = binary.BigEndian.AppendUint16(dst, uint16(len(noise)))
	dst = append(dst, noise...)
	mac := len(dst) - start
	dst = append(dst, make([]byte, MACLen)...)
	dst = append(dst, 0) // an empty path record
	return dst, mac, nil
}

// ParseInitiation parses an Initiation datagram.
func ParseInitiation(msg []byte) (Initiation, error) {
	h, err := ParseHeader(msg)
	if err != nil {
		return Initiation{}, err
	}
	if h.Type != TypeInitiation {
		return Initiation{}, ErrType
	}
	r := reader{b: msg[HeaderLen:]}
	n := int(r.u16())
	noise := r.take(n)
	authEnd := len(msg) - len(r.b)
	mac := r.take(MACLen)
	if r.err != nil {
		return Initiation{}, r.err
	}
	in := Initiation{Sender: h.Sender, Noise: noise, Authenticated: msg[:authEnd:authEnd], PathBytes: r.b}
	copy(in.MAC2[:], mac)
	if in.Path, err = ParsePathRecord(r.b); err != nil {
		return Initiation{}, err
	}
	return in, nil
}

// InitiationDigest is SHA-256 of an initiation's authenticated bytes: what
// the responder's signature binds its answer to.
func InitiationDigest(in *Initiation) [32]byte {
	return sha256.Sum256(in.Authenticated)
}

// Response is a parsed Response message (type 2).
type Response struct {
	Sender, Receiver uint32
	Noise            []byte
	Path             PathRecord
	PathBytes        []byte
}

// AppendResponse appends a Response with no path record to dst.
func AppendResponse(dst []byte, sender, receiver uint32, noise []byte) ([]byte, error) {
	if sender == 0 || receiver == 0 {
		return nil, ErrIndex
	}
	if len(noise) > MaxMessage-HeaderLen-4-2-1 {
		return nil, ErrLong
	}
	start := len(dst)
	dst = append(dst, make([]byte, HeaderLen)...)
	Header{Type: TypeResponse, Sender: sender}.put(dst[start:])
	dst = binary.BigEndian.AppendUint32(dst, receiver)
	dst = binary.BigEndian.AppendUint16(dst, uint16(len(noise)))
	dst = append(dst, noise...)
	return append(dst, 0), nil
}

// ParseResponse parses a Response datagram.
func ParseResponse(msg []byte) (Response, error) {
	h, err := ParseHeader(msg)
	if err != nil {
		return Response{}, err
	}
	if h.Type != TypeResponse {
		return Response{}, ErrType
	}
	r := reader{b: msg[HeaderLen:]}
	recv := r.u32()
	noise := r.take(int(r.u16()))
	if r.err != nil {
		return Response{}, r.err
	}
	if recv == 0 {
		return Response{}, ErrIndex
	}
	resp := Response{Sender: h.Sender, Receiver: recv, Noise: noise, PathBytes: r.b}
	if resp.Path, err = ParsePathRecord(r.b); err != nil {
		return Response{}, err
	}
	return resp, nil
}

// CookieReplyLen is the length of a CookieReply.
const CookieReplyLen = HeaderLen + MACLen

// AppendCookieReply appends a CookieReply answering the initiation whose
// sender index was echo.
func AppendCookieReply(dst []byte, echo uint32, cookie [MACLen]byte) ([]byte, error) {
	if echo == 0 {
		return nil, ErrIndex
	}
	start := len(dst)
	dst = append(dst, make([]byte, HeaderLen)...)
	Header{Type: TypeCookieReply, Sender: echo}.put(dst[start:])
	return append(dst, cookie[:]...), nil
}

// ParseCookieReply returns the echoed index and the cookie.
func ParseCookieReply(msg []byte) (uint32, [MACLen]byte, error) {
	var cookie [MACLen]byte
	h, err := ParseHeader(msg)
	if err != nil {
		return 0, cookie, err
	}
	if h.Type != TypeCookieReply {
		return 0, cookie, ErrType
	}
	if len(msg) != CookieReplyLen {
		return 0, cookie, ErrLength
	}
	copy(cookie[:], msg[HeaderLen:])
	return h.Sender, cookie, nil
}

// UnknownSALen is the length of an UnknownSA message: the header alone.
const UnknownSALen = HeaderLen

// AppendUnknownSA appends an UnknownSA message for a data packet of SPI
// spi (which is never 0: its index is not): the header, with the SPI in
// the sender index's place.
func AppendUnknownSA(dst []byte, spi uint32) ([]byte, error) {
	if spi&0x7fffffff == 0 {
		return nil, ErrIndex
	}
	start := len(dst)
	dst = append(dst, make([]byte, HeaderLen)...)
	Header{Type: TypeUnknownSA, Sender: spi}.put(dst[start:])
	return dst, nil
}

// ParseUnknownSA returns the SPI an UnknownSA message names.
func ParseUnknownSA(msg []byte) (uint32, error) {
	h, err := ParseHeader(msg)
	switch {
	case err != nil:
		return 0, err
	case h.Type != TypeUnknownSA:
		return 0, ErrType
	case len(msg) != UnknownSALen:
		return 0, ErrLength
	case h.Sender&0x7fffffff == 0:
		return 0, ErrIndex
	}
	return h.Sender, nil
}

// Prologue is the Noise prologue of a handshake started with sender index
// sender: both sides must use the same, so the index cannot be changed on
// the way.
func Prologue(sender uint32) []byte {
	return binary.BigEndian.AppendUint32([]byte("enclave control v1"), sender)
}

// PathOffset returns where the path record of a handshake datagram
// (Initiation or Response) begins, for AppendEntry.
func PathOffset(msg []byte) (int, error) {
	h, err := ParseHeader(msg)
	if err != nil {
		return 0, err
	}
	switch h.Type {
	case TypeInitiation:
		in, err := ParseInitiation(msg)
		if err != nil {
			return 0, err
		}
		return len(in.Authenticated) + MACLen, nil
	case TypeResponse:
		resp, err := ParseResponse(msg)
		if err != nil {
			return 0, err
		}
		return HeaderLen + 4 + 2 + len(resp.Noise), nil
	}
	return 0, ErrType
}
