package control

import (
	"crypto/sha256"
	"encoding/binary"
)

// A path entry that travels apart (TypeEntry): a gateway whose entry
// would take a handshake past MaxHandshake puts a stub in the path record
// instead (PathVersionStub, the entry's SHA-256) and sends the entry to
// the handshake's destination in a message of its own, just before the
// handshake:
//
//	header [8]      sender index = the handshake's sender index
//	entry           [2] length ‖ the entry, exactly as a path record holds it

// Entry is a parsed TypeEntry message.
type Entry struct {
	// Sender is the sender index of the handshake it belongs to.
	Sender uint32
	// Raw is the entry's bytes (length included) and Hash their SHA-256:
	// what the handshake's stub names.
	Raw  []byte
	Hash [sha256.Size]byte
}

// AppendEntryMessage appends a TypeEntry message carrying the entry bytes
// raw (EntryBytes) of the handshake with sender index sender to dst.
func AppendEntryMessage(dst []byte, sender uint32, raw []byte) ([]byte, error) {
	if sender == 0 {
		return nil, ErrIndex
	}
	if HeaderLen+len(raw) > MaxMessage {
		return nil, ErrLong
	}
	start := len(dst)
	dst = append(dst, make([]byte, HeaderLen)...)
	Header{Type: TypeEntry, Sender: sender}.put(dst[start:])
	return append(dst, raw...), nil
}

// ParseEntryMessage parses a TypeEntry message: one well-formed entry
// that is no stub. Raw aliases msg.
func ParseEntryMessage(msg []byte) (Entry, error) {
	h, err := ParseHeader(msg)
	if err != nil {
		return Entry{}, err
	}
	if h.Type != TypeEntry {
		return Entry{}, ErrType
	}
	raw := msg[HeaderLen:]
	if len(raw) < 2 || int(binary.BigEndian.Uint16(raw)) != len(raw)-2 {
		return Entry{}, wrap(ErrPath, ErrLength)
	}
	e, err := parseEntry(raw[2:])
	if err != nil {
		return Entry{}, err
	}
	if e.Version == PathVersionStub {
		return Entry{}, wrap(ErrPath, ErrVersion)
	}
	return Entry{Sender: h.Sender, Raw: raw, Hash: sha256.Sum256(raw)}, nil
}
