// Package control is the control protocol of docs/PROTOCOL.md: the bytes of
// every message agents, servers and gateways exchange to set up SAs, their
// limits, and the path record of enclave discovery. It encodes and parses;
// it does no I/O and no cryptography beyond hashing the bytes that are
// signed. Every parser returns a typed error (errors.Is against the Err
// values here) and never panics on any input.
package control

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Protocol constants.
const (
	Magic   = 0x45 // 'E'
	Version = 1

	// HeaderLen is the common header: magic, version, type, reserved,
	// sender index.
	HeaderLen = 8
	// MaxMessage bounds a control datagram.
	MaxMessage = 4096
	// MaxHandshake is the most a gateway lets a handshake grow to: a
	// datagram of it fits IPv6's minimum MTU (1280) with its IPv6 and UDP
	// headers, so that no handshake relies on IP fragmentation. An entry
	// that would take it past this travels apart (TypeEntry).
	MaxHandshake = 1280 - 40 - 8
	// MaxCert bounds a DER certificate carried in a message.
	MaxCert = 2048
	// MACLen is the length of mac2 and of a cookie.
	MACLen = 16
	// SignatureLen is an Ed25519 signature.
	SignatureLen = 64
	// KeyLen is an X25519 public key.
	KeyLen = 32
	// MaxPathEntries and MaxPathPairs bound the path record.
	MaxPathEntries = 8
	MaxPathPairs   = 16
	// DefaultDataPort and DefaultControlPort are the UDP ports.
	DefaultDataPort    = 1000
	DefaultControlPort = DefaultDataPort + 1
)

// Type is a message type (header byte 2).
type Type uint8

// The message types.
const (
	TypeInitiation  Type = 1
	TypeResponse    Type = 2
	TypeCookieReply Type = 3
	TypeSealed      Type = 4
	// TypeUnknownSA tells the sender of a data packet that its receiver
	// holds no SA of that SPI (it restarted or lost its state). It is not
	// authenticated: it may only prompt a rate-limited handshake.
	TypeUnknownSA Type = 5
	// TypeEntry carries a gateway's path entry apart from the handshake
	// it belongs to, whose path record holds a stub naming it (path.go):
	// so that a tagged handshake stays within MaxHandshake.
	TypeEntry Type = 6
)

func (t Type) String() string {
	switch t {
	case TypeInitiation:
		return "initiation"
	case TypeResponse:
		return "response"
	case TypeCookieReply:
		return "cookie-reply"
	case TypeSealed:
		return "sealed"
	case TypeUnknownSA:
		return "unknown-sa"
	case TypeEntry:
		return "entry"
	}
	return fmt.Sprintf("type-%d", uint8(t))
}

// Errors of parsing. Each names what is wrong; callers count drops by them.
var (
	ErrShort     = errors.New("control: message too short")
	ErrLong      = errors.New("control: message too long")
	ErrMagic     = errors.New("control: not an Enclave control message")
	ErrVersion   = errors.New("control: unsupported protocol version")
	ErrType      = errors.New("control: unknown or unexpected message type")
	ErrReserved  = errors.New("control: reserved field is not zero")
	ErrIndex     = errors.New("control: session index is zero")
	ErrLength    = errors.New("control: a length field does not fit the message")
	ErrTrailing  = errors.New("control: trailing bytes")
	ErrCert      = errors.New("control: certificate length out of range")
	ErrPath      = errors.New("control: malformed path record")
	ErrPayload   = errors.New("control: malformed handshake payload")
	ErrGrant     = errors.New("control: malformed SA grant")
	ErrInner     = errors.New("control: malformed sealed message")
	ErrTooMany   = errors.New("control: too many entries")
	ErrPSP       = errors.New("control: PSP version must be 0 or 1")
	ErrReason    = errors.New("control: reason text too long")
	ErrEncodeArg = errors.New("control: value cannot be encoded")
)

// Header is the common header of every message.
type Header struct {
	Type   Type
	Sender uint32
}

// put writes h into b[:HeaderLen].
func (h Header) put(b []byte) {
	b[0], b[1], b[2], b[3] = Magic, Version, byte(h.Type), 0
	binary.BigEndian.PutUint32(b[4:], h.Sender)
}

// ParseHeader checks and reads the header of a datagram. It is the first
// step of every receive: the type says which parser comes next.
func ParseHeader(msg []byte) (Header, error) {
	switch {
	case len(msg) < HeaderLen:
		return Header{}, ErrShort
	case len(msg) > MaxMessage:
		return Header{}, ErrLong
	case msg[0] != Magic:
		return Header{}, ErrMagic
	case msg[1] != Version:
		return Header{}, ErrVersion
	case msg[3] != 0:
		return Header{}, ErrReserved
	}
	h := Header{Type: Type(msg[2]), Sender: binary.BigEndian.Uint32(msg[4:])}
	if h.Type < TypeInitiation || h.Type > TypeEntry {
		return Header{}, ErrType
	}
	if h.Sender == 0 {
		return Header{}, ErrIndex
	}
	return h, nil
}

// reader walks a message, recording the first error; later reads return
// zero values, so a parser reads every field and checks once.
type reader struct {
	b   []byte
	err error
}

func (r *reader) fail(err error) {
	if r.err == nil {
		r.err = err
	}
}

func (r *reader) take(n int) []byte {
	if r.err != nil {
		return nil
	}
	if n < 0 || n > len(r.b) {
		r.fail(ErrLength)
		return nil
	}
	v := r.b[:n:n]
	r.b = r.b[n:]
	return v
}

func (r *reader) u8() uint8 {
	if b := r.take(1); b != nil {
		return b[0]
	}
	return 0
}

func (r *reader) u16() uint16 {
	if b := r.take(2); b != nil {
		return binary.BigEndian.Uint16(b)
	}
	return 0
}

func (r *reader) u32() uint32 {
	if b := r.take(4); b != nil {
		return binary.BigEndian.Uint32(b)
	}
	return 0
}

func (r *reader) u64() uint64 {
	if b := r.take(8); b != nil {
		return binary.BigEndian.Uint64(b)
	}
	return 0
}

// done fails on anything left over.
func (r *reader) done() error {
	if r.err == nil && len(r.b) != 0 {
		r.fail(ErrTrailing)
	}
	return r.err
}

// cert reads a 2-byte length and a certificate of 1..MaxCert bytes (or 0
// bytes when optional).
func (r *reader) cert(optional bool) []byte {
	n := int(r.u16())
	if r.err == nil && (n > MaxCert || (n == 0 && !optional)) {
		r.fail(ErrCert)
		return nil
	}
	return r.take(n)
}

// wrap tags a reader error with the kind of thing being parsed, keeping
// both testable with errors.Is.
func wrap(kind, err error) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, kind) {
		return err
	}
	return fmt.Errorf("%w: %w", kind, err)
}
