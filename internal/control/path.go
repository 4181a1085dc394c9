package control

import (
	"crypto/sha256"
	"encoding/binary"
	"net/netip"
)

// Path entry flags.
const (
	PathSigned     = 1 << 0
	PathNeedKey    = 1 << 1
	PathSelfReport = 1 << 2
	pathFlagsKnown = PathSigned | PathNeedKey | PathSelfReport
)

// Pair is an enclave pair an intermediary holds keys for.
type Pair struct{ A, B uint16 }

// Path entry versions: 2 names the destination the entry's author sent
// the handshake to; 1 (written by gateways before it) does not, and is
// parsed so that an old gateway's handshakes still pass, but never trusted
// to place a client.
const (
	PathVersion1 = 1
	PathVersion  = 2
	// PathVersionStub is a stub: the entry travels apart, in a TypeEntry
	// message, and the stub holds the SHA-256 of its bytes (length
	// included). Later entries sign the stub, which binds them to it.
	PathVersionStub = 3
	pathAddrLen     = 18 // [16] address, IPv4 mapped ‖ [2] port
	// StubLen is a stub's length in a path record, its length field
	// included.
	StubLen = 2 + 2 + sha256.Size
)

// PathEntry is one entry of a path record: who forwarded the handshake,
// where it stands, what it can read, and where it sent the handshake.
type PathEntry struct {
	// Version is the entry's version as parsed; entries are written in
	// PathVersion whatever it holds.
	Version uint8
	Flags   uint8
	Enclave uint16
	Pairs   []Pair
	// To is the address and port the author forwarded the handshake to
	// (zero when it does not say: unsigned entries, version 1). It is
	// signed with the rest, so that a tagged handshake replayed towards
	// another server names the wrong destination there.
	To        netip.AddrPort
	Cert      []byte // DER; empty when unsigned
	Signature [SignatureLen]byte
	// Raw is the entry's bytes with its length prefix, as parsed (set by
	// ParsePathRecord; signatures cover these exact bytes). For an entry
	// that travelled apart, the stub's bytes: what later entries signed.
	Raw []byte
	// Stub is the SHA-256 of the detached entry a stub (PathVersionStub)
	// names; Detached marks an entry put in its stub's place.
	Stub     [sha256.Size]byte
	Detached bool
}

// Signed reports whether the entry carries a certificate and signature.
func (e *PathEntry) Signed() bool { return e.Flags&PathSigned != 0 }

// PathRecord is the list of entries, nearest the initiator first.
type PathRecord struct {
	Entries []PathEntry
}

// ParsePathRecord parses a path record (the whole rest of a handshake
// datagram after its authenticated part).
func ParsePathRecord(b []byte) (PathRecord, error) {
	r := reader{b: b}
	n := int(r.u8())
	if r.err != nil {
		return PathRecord{}, wrap(ErrPath, r.err)
	}
	if n > MaxPathEntries {
		return PathRecord{}, wrap(ErrPath, ErrTooMany)
	}
	var rec PathRecord
	for i := 0; i < n; i++ {
		start := r.b
		l := int(r.u16())
		body := r.take(l)
		if r.err != nil {
			return PathRecord{}, wrap(ErrPath, r.err)
		}
		e, err := parseEntry(body)
		if err != nil {
			return PathRecord{}, err
		}
		e.Raw = start[: 2+l : 2+l]
		rec.Entries = append(rec.Entries, e)
	}
	if err := r.done(); err != nil {
		return PathRecord{}, wrap(ErrPath, err)
	}
	return rec, nil
}

func parseEntry(b []byte) (PathEntry, error) {
	r := reader{b: b}
	var e PathEntry
	e.Version = r.u8()
	if r.err == nil && e.Version == PathVersionStub {
		if r.u8() != 0 {
			r.fail(ErrReserved)
		}
		copy(e.Stub[:], r.take(sha256.Size))
		if err := r.done(); err != nil {
			return PathEntry{}, wrap(ErrPath, err)
		}
		return e, nil
	}
	if r.err == nil && e.Version != PathVersion && e.Version != PathVersion1 {
		return e, wrap(ErrPath, ErrVersion)
	}
	e.Flags = r.u8()
	e.Enclave = r.u16()
	np := int(r.u8())
	if r.err == nil && np > MaxPathPairs {
		return e, wrap(ErrPath, ErrTooMany)
	}
	for i := 0; i < np && r.err == nil; i++ {
		e.Pairs = append(e.Pairs, Pair{r.u16(), r.u16()})
	}
	if e.Version == PathVersion {
		if a := r.take(pathAddrLen); r.err == nil {
			ip := netip.AddrFrom16([16]byte(a[:16])).Unmap()
			if port := binary.BigEndian.Uint16(a[16:]); port != 0 || !ip.IsUnspecified() {
				e.To = netip.AddrPortFrom(ip, port)
			}
		}
	}
	e.Cert = r.cert(true)
	if r.err == nil && e.Flags&^pathFlagsKnown != 0 {
		r.fail(ErrReserved)
	}
	signed := e.Flags&PathSigned != 0
	if r.err == nil && signed != (len(e.Cert) > 0) {
		r.fail(ErrCert) // a signed entry has a certificate, an unsigned one none
	}
	if signed {
		copy(e.Signature[:], r.take(SignatureLen))
	}
	if err := r.done(); err != nil {
		return PathEntry{}, wrap(ErrPath, err)
	}
	return e, nil
}

// entryBody is the entry's bytes after its length, up to the signature,
// in the current version.
func (e *PathEntry) entryBody() ([]byte, error) {
	if len(e.Pairs) > MaxPathPairs || len(e.Cert) > MaxCert || e.Flags&^pathFlagsKnown != 0 {
		return nil, ErrEncodeArg
	}
	if (e.Flags&PathSigned != 0) != (len(e.Cert) > 0) {
		return nil, ErrCert
	}
	b := []byte{PathVersion, e.Flags}
	b = binary.BigEndian.AppendUint16(b, e.Enclave)
	b = append(b, byte(len(e.Pairs)))
	for _, p := range e.Pairs {
		b = binary.BigEndian.AppendUint16(b, p.A)
		b = binary.BigEndian.AppendUint16(b, p.B)
	}
	var to [16]byte
	if e.To.IsValid() {
		to = e.To.Addr().As16() // an IPv4 address as IPv4-mapped
	}
	b = append(b, to[:]...)
	b = binary.BigEndian.AppendUint16(b, e.To.Port())
	b = binary.BigEndian.AppendUint16(b, uint16(len(e.Cert)))
	return append(b, e.Cert...), nil
}

// PathSigned returns the bytes an entry's author signs: the domain, the
// hash of the handshake's Noise message, the raw record entries before it
// (prior), and the entry up to its signature.
func PathSignedBytes(noise []byte, prior []byte, e *PathEntry) ([]byte, error) {
	if e.Version == PathVersion1 {
		return nil, ErrVersion // its author signed what no one checks any more
	}
	body, err := e.entryBody()
	if err != nil {
		return nil, err
	}
	h := sha256.Sum256(noise)
	m := append([]byte("enclave path v1"), h[:]...)
	m = append(m, prior...)
	return append(m, body...), nil
}

// PriorBytes is the concatenation of the raw bytes of entries[:i]: what
// entry i's signature covers besides itself.
func (rec *PathRecord) PriorBytes(i int) []byte {
	var b []byte
	for _, e := range rec.Entries[:i] {
		b = append(b, e.Raw...)
	}
	return b
}

// AppendEntry appends e (with its signature, when signed) to the path
// record at the end of msg, a handshake datagram whose path record starts
// at offset pathAt, and returns the new datagram. The entry count is
// updated in place; nothing before pathAt changes.
func AppendEntry(msg []byte, pathAt int, e *PathEntry) ([]byte, error) {
	raw, err := EntryBytes(nil, e)
	if err != nil {
		return nil, err
	}
	return appendRaw(msg, pathAt, raw)
}

// EntryBytes appends e as a path record holds it (its length, the entry,
// its signature when signed) to dst: what a TypeEntry message carries.
func EntryBytes(dst []byte, e *PathEntry) ([]byte, error) {
	body, err := e.entryBody()
	if err != nil {
		return nil, err
	}
	if e.Flags&PathSigned != 0 {
		body = append(body, e.Signature[:]...)
	}
	dst = binary.BigEndian.AppendUint16(dst, uint16(len(body)))
	return append(dst, body...), nil
}

// AppendStub appends the stub of the entry whose bytes (EntryBytes) are
// raw to the path record of msg, as AppendEntry does the entry itself.
func AppendStub(msg []byte, pathAt int, raw []byte) ([]byte, error) {
	return appendRaw(msg, pathAt, stubBytes(sha256.Sum256(raw)))
}

// stubBytes is a stub naming the entry of hash h, as a record holds it.
func stubBytes(h [sha256.Size]byte) []byte {
	return append([]byte{0, StubLen - 2, PathVersionStub, 0}, h[:]...)
}

// appendRaw appends one entry's bytes to msg's path record.
func appendRaw(msg []byte, pathAt int, raw []byte) ([]byte, error) {
	if pathAt < 0 || pathAt >= len(msg) {
		return nil, ErrLength
	}
	if int(msg[pathAt]) >= MaxPathEntries {
		return nil, ErrTooMany
	}
	if len(msg)+len(raw) > MaxMessage {
		return nil, ErrLong
	}
	out := append(msg, raw...)
	out[pathAt]++
	return out, nil
}

// Resolve puts in place of stub i of rec the entry that travelled apart
// (its bytes as EntryBytes wrote them), when they are the ones the stub
// names. The entry keeps the stub's bytes as its Raw: later entries
// signed those.
func (rec *PathRecord) Resolve(i int, raw []byte) error {
	if i < 0 || i >= len(rec.Entries) || rec.Entries[i].Version != PathVersionStub {
		return ErrPath
	}
	if sha256.Sum256(raw) != rec.Entries[i].Stub {
		return ErrPath
	}
	if len(raw) < 2 || int(binary.BigEndian.Uint16(raw)) != len(raw)-2 {
		return wrap(ErrPath, ErrLength)
	}
	e, err := parseEntry(raw[2:])
	if err != nil {
		return err
	}
	if e.Version == PathVersionStub {
		return ErrPath // a stub of a stub
	}
	e.Raw, e.Stub, e.Detached = rec.Entries[i].Raw, rec.Entries[i].Stub, true
	rec.Entries[i] = e
	return nil
}
