package control

import (
	"encoding/binary"
	"time"
)

// MaxSkew is how far an initiation's timestamp may be from the
// responder's clock.
const MaxSkew = 2 * time.Minute

// InitiatorPayload is the payload of noise message 1.
type InitiatorPayload struct {
	Timestamp time.Time
	Cert      []byte // DER
	Signature [SignatureLen]byte
}

// Append appends the payload's bytes to dst.
func (p *InitiatorPayload) Append(dst []byte) ([]byte, error) {
	if len(p.Cert) == 0 || len(p.Cert) > MaxCert {
		return nil, ErrCert
	}
	dst = append(dst, 1, 0)
	dst = binary.BigEndian.AppendUint64(dst, uint64(p.Timestamp.UnixNano()))
	dst = binary.BigEndian.AppendUint16(dst, uint16(len(p.Cert)))
	dst = append(dst, p.Cert...)
	return append(dst, p.Signature[:]...), nil
}

// ParseInitiatorPayload parses the payload of noise message 1.
func ParseInitiatorPayload(b []byte) (InitiatorPayload, error) {
	r := reader{b: b}
	var p InitiatorPayload
	if v := r.u8(); r.err == nil && v != 1 {
		return p, wrap(ErrPayload, ErrVersion)
	}
	if f := r.u8(); r.err == nil && f != 0 {
		return p, wrap(ErrPayload, ErrReserved)
	}
	p.Timestamp = time.Unix(0, int64(r.u64())).UTC()
	p.Cert = r.cert(false)
	copy(p.Signature[:], r.take(SignatureLen))
	if err := r.done(); err != nil {
		return InitiatorPayload{}, wrap(ErrPayload, err)
	}
	return p, nil
}

// InitiatorSigned is what the initiator signs: its Noise static key, the
// timestamp and its sender index.
func InitiatorSigned(static []byte, ts time.Time, sender uint32) []byte {
	m := append([]byte("enclave handshake v1 initiator"), static...)
	m = binary.BigEndian.AppendUint64(m, uint64(ts.UnixNano()))
	return binary.BigEndian.AppendUint32(m, sender)
}

// ResponderSigned is what the responder signs: its Noise static key and the
// digest of the initiation it answers.
func ResponderSigned(static []byte, initiation [32]byte) []byte {
	m := append([]byte("enclave handshake v1 responder"), static...)
	return append(m, initiation[:]...)
}

// Responder flags.
const (
	// FlagDirectKeyExchange: the server hands SA keys to authorised
	// intermediaries that cannot derive them (DESIGN §5.5).
	FlagDirectKeyExchange = 1 << 0
)

// Refusal codes (docs/PROTOCOL.md).
type Refusal uint8

// The refusal codes.
const (
	RefusedPolicy    Refusal = 1
	RefusedNoKey     Refusal = 2
	RefusedCert      Refusal = 3
	RefusedRole      Refusal = 4
	RefusedRevoked   Refusal = 5
	RefusedEnclave   Refusal = 6
	RefusedReplay    Refusal = 7
	RefusedBusy      Refusal = 8
	RefusedMalformed Refusal = 9
	maxRefusal               = RefusedMalformed
	maxReasonText            = 255
	ckLenV0, ckLenV1         = 16, 32
)

var refusalNames = map[Refusal]string{
	RefusedPolicy: "policy", RefusedNoKey: "no_key", RefusedCert: "certificate", RefusedRole: "role",
	RefusedRevoked: "revoked", RefusedEnclave: "enclave", RefusedReplay: "replay", RefusedBusy: "busy",
	RefusedMalformed: "malformed",
}

// String is the code's name as metric labels use it.
func (r Refusal) String() string {
	if n, ok := refusalNames[r]; ok {
		return n
	}
	return "unknown"
}

// Grant is the SA a server grants: the VC both directions carry, the
// generation, the two SPIs and CKs, and how long it may be used.
type Grant struct {
	PSPVersion uint8
	Enclave    uint16 // i, the server's enclave
	Peer       uint16 // j, the initiator's enclave
	Server     uint32 // k
	Generation uint32
	SPIOut     uint32 // initiator → responder
	SPIIn      uint32 // responder → initiator
	Lifetime   time.Duration
	KeyOut     []byte // CK initiator → responder
	KeyIn      []byte // CK responder → initiator
}

// ResponderPayload is the payload of noise message 2: the server's
// certificate and signature, and a grant or a refusal.
type ResponderPayload struct {
	Flags     uint8
	Cert      []byte
	Signature [SignatureLen]byte
	Grant     *Grant  // set when granted
	Refusal   Refusal // set when refused
	Reason    string  // the refusal's text
	// Session: no SA, only the control session (the answer to an
	// intermediary, which holds no SA of its own but receives keys and
	// sends rekey requests over the session, §5.5 and §5.6).
	Session bool
}

// resultSession is the result byte of a session-only answer.
const resultSession = 128

// Append appends the payload's bytes to dst.
func (p *ResponderPayload) Append(dst []byte) ([]byte, error) {
	if len(p.Cert) == 0 || len(p.Cert) > MaxCert {
		return nil, ErrCert
	}
	dst = append(dst, 1, p.Flags)
	dst = binary.BigEndian.AppendUint16(dst, uint16(len(p.Cert)))
	dst = append(dst, p.Cert...)
	dst = append(dst, p.Signature[:]...)
	if g := p.Grant; g != nil {
		return g.append(append(dst, 0))
	}
	if p.Session {
		return append(dst, resultSession), nil
	}
	if p.Refusal == 0 || p.Refusal > maxRefusal {
		return nil, ErrEncodeArg
	}
	if len(p.Reason) > maxReasonText {
		return nil, ErrReason
	}
	dst = append(dst, byte(p.Refusal), byte(len(p.Reason)))
	return append(dst, p.Reason...), nil
}

func ckLen(v uint8) (int, error) {
	switch v {
	case 0:
		return ckLenV0, nil
	case 1:
		return ckLenV1, nil
	}
	return 0, ErrPSP
}

func (g *Grant) append(dst []byte) ([]byte, error) {
	n, err := ckLen(g.PSPVersion)
	if err != nil {
		return nil, err
	}
	if len(g.KeyOut) != n || len(g.KeyIn) != n || g.Lifetime < 0 || g.Lifetime/time.Second > 1<<32-1 {
		return nil, ErrEncodeArg
	}
	dst = append(dst, g.PSPVersion)
	dst = binary.BigEndian.AppendUint16(dst, g.Enclave)
	dst = binary.BigEndian.AppendUint16(dst, g.Peer)
	dst = binary.BigEndian.AppendUint32(dst, g.Server)
	dst = binary.BigEndian.AppendUint32(dst, g.Generation)
	dst = binary.BigEndian.AppendUint32(dst, g.SPIOut)
	dst = binary.BigEndian.AppendUint32(dst, g.SPIIn)
	dst = binary.BigEndian.AppendUint32(dst, uint32(g.Lifetime/time.Second))
	dst = append(dst, g.KeyOut...)
	return append(dst, g.KeyIn...), nil
}

// ParseResponderPayload parses the payload of noise message 2. A grant is
// checked for shape: PSP version 0 or 1, enclaves non-zero, both SPIs with
// a non-zero index and the generation's parity, keys of the version's
// length.
func ParseResponderPayload(b []byte) (ResponderPayload, error) {
	r := reader{b: b}
	var p ResponderPayload
	if v := r.u8(); r.err == nil && v != 1 {
		return p, wrap(ErrPayload, ErrVersion)
	}
	p.Flags = r.u8()
	p.Cert = r.cert(false)
	copy(p.Signature[:], r.take(SignatureLen))
	result := Refusal(r.u8())
	if r.err != nil {
		return ResponderPayload{}, wrap(ErrPayload, r.err)
	}
	if result == 0 {
		g, err := parseGrant(&r)
		if err != nil {
			return ResponderPayload{}, err
		}
		p.Grant = g
		return p, nil
	}
	if result == resultSession {
		p.Session = true
		if err := r.done(); err != nil {
			return ResponderPayload{}, wrap(ErrPayload, err)
		}
		return p, nil
	}
	if result > maxRefusal {
		return ResponderPayload{}, wrap(ErrPayload, ErrType)
	}
	p.Refusal = result
	p.Reason = string(r.take(int(r.u8())))
	if err := r.done(); err != nil {
		return ResponderPayload{}, wrap(ErrPayload, err)
	}
	return p, nil
}

func parseGrant(r *reader) (*Grant, error) {
	g := &Grant{PSPVersion: r.u8()}
	g.Enclave, g.Peer = r.u16(), r.u16()
	g.Server, g.Generation = r.u32(), r.u32()
	g.SPIOut, g.SPIIn = r.u32(), r.u32()
	g.Lifetime = time.Duration(r.u32()) * time.Second
	if r.err != nil {
		return nil, wrap(ErrGrant, r.err)
	}
	n, err := ckLen(g.PSPVersion)
	if err != nil {
		return nil, wrap(ErrGrant, err)
	}
	g.KeyOut, g.KeyIn = r.take(n), r.take(n)
	if err := r.done(); err != nil {
		return nil, wrap(ErrGrant, err)
	}
	parity := g.Generation & 1
	for _, spi := range []uint32{g.SPIOut, g.SPIIn} {
		if spi&0x7fffffff == 0 || spi>>31 != parity {
			return nil, wrap(ErrGrant, ErrEncodeArg)
		}
	}
	if g.Enclave == 0 || g.Peer == 0 || g.SPIOut == g.SPIIn {
		return nil, wrap(ErrGrant, ErrEncodeArg)
	}
	return g, nil
}
