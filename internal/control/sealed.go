package control

import (
	"encoding/binary"
	"time"
)

// SealedOverhead is the framing of a Sealed message before its ciphertext.
const SealedOverhead = HeaderLen + 4 + 8

// Sealed is a parsed Sealed message (type 4): the framing around a
// ciphertext that the session's transport key opens.
type Sealed struct {
	Sender, Receiver uint32
	Counter          uint64
	// AD is the additional data of the AEAD: the framing bytes.
	AD []byte
	// Ciphertext includes the AEAD tag.
	Ciphertext []byte
}

// AppendSealedFraming appends the framing of a Sealed message to dst; the
// caller appends the ciphertext, with the framing as additional data.
func AppendSealedFraming(dst []byte, sender, receiver uint32, counter uint64) ([]byte, error) {
	if sender == 0 || receiver == 0 {
		return nil, ErrIndex
	}
	start := len(dst)
	dst = append(dst, make([]byte, HeaderLen)...)
	Header{Type: TypeSealed, Sender: sender}.put(dst[start:])
	dst = binary.BigEndian.AppendUint32(dst, receiver)
	return binary.BigEndian.AppendUint64(dst, counter), nil
}

// ParseSealed parses the framing of a Sealed message.
func ParseSealed(msg []byte) (Sealed, error) {
	h, err := ParseHeader(msg)
	if err != nil {
		return Sealed{}, err
	}
	if h.Type != TypeSealed {
		return Sealed{}, ErrType
	}
	if len(msg) < SealedOverhead+16 {
		return Sealed{}, ErrShort
	}
	s := Sealed{
		Sender:     h.Sender,
		Receiver:   binary.BigEndian.Uint32(msg[HeaderLen:]),
		Counter:    binary.BigEndian.Uint64(msg[HeaderLen+4:]),
		AD:         msg[:SealedOverhead:SealedOverhead],
		Ciphertext: msg[SealedOverhead:],
	}
	if s.Receiver == 0 {
		return Sealed{}, ErrIndex
	}
	return s, nil
}

// InnerType is the type of a sealed message's plaintext.
type InnerType uint8

// The sealed message types.
const (
	InnerRekeyNotice  InnerType = 1
	InnerRekeyRequest InnerType = 2
	InnerKeyDelivery  InnerType = 3
	InnerClose        InnerType = 4
	InnerRefused      InnerType = 5
	// InnerKeyAck: a gateway installed the keys of the SA whose client
	// sends with Ack (the delivery's SPIOut); the server releases the
	// SA's Response.
	InnerKeyAck InnerType = 6
)

// Rekey reasons.
const (
	RekeyRotation   = 1
	RekeyRevocation = 2
	RekeyLifetime   = 3
	RekeyGateway    = 4
	// RekeyPolicy (a Close): the pair is no longer allowed.
	RekeyPolicy = 5
)

// RekeyNotice asks the client to set up a new SA before Deadline.
type RekeyNotice struct {
	Reason   uint8
	Deadline time.Duration // until the old SA stops being accepted
}

// Proof of path (§5.6). A server keeps, for each SA it receives on, the
// last ProofRecent packets it accepted and the last ProofRecent whose IV
// is a multiple of ProofSparse (so that a busy SA's proofs last), and
// takes a RekeyRequest only for one of them accepted within ProofMaxAge.
// A gateway proves with the newest packet of the sparse kind it forwarded
// within ProofMaxAge/2, else the newest packet.
const (
	ProofRecent = 4
	ProofSparse = 1024
	ProofMaxAge = 30 * time.Second
)

// RekeyRequest is a gateway's proof that it forwards an SA's packets.
type RekeyRequest struct {
	SPI uint32
	IV  uint64
	ICV [16]byte
}

// Inner is a decoded sealed plaintext: exactly one field is set.
type Inner struct {
	Type    InnerType
	Rekey   *RekeyNotice
	Request *RekeyRequest
	Keys    *Grant  // InnerKeyDelivery: one SA's keys, in the grant's form
	Close   uint8   // InnerClose: the reason
	Refusal Refusal // InnerRefused
	Reason  string  // InnerRefused
	Ack     uint32  // InnerKeyAck: the SPI the keys' client sends with
}

// AppendInner appends the plaintext of in to dst.
func AppendInner(dst []byte, in *Inner) ([]byte, error) {
	dst = append(dst, byte(in.Type))
	switch in.Type {
	case InnerRekeyNotice:
		if in.Rekey == nil || in.Rekey.Deadline < 0 || in.Rekey.Deadline/time.Second > 1<<32-1 {
			return nil, ErrEncodeArg
		}
		dst = append(dst, in.Rekey.Reason)
		return binary.BigEndian.AppendUint32(dst, uint32(in.Rekey.Deadline/time.Second)), nil
	case InnerRekeyRequest:
		if in.Request == nil {
			return nil, ErrEncodeArg
		}
		dst = binary.BigEndian.AppendUint32(dst, in.Request.SPI)
		dst = binary.BigEndian.AppendUint64(dst, in.Request.IV)
		return append(dst, in.Request.ICV[:]...), nil
	case InnerKeyDelivery:
		if in.Keys == nil {
			return nil, ErrEncodeArg
		}
		return in.Keys.append(dst)
	case InnerClose:
		return append(dst, in.Close), nil
	case InnerRefused:
		if in.Refusal == 0 || in.Refusal > maxRefusal {
			return nil, ErrEncodeArg
		}
		if len(in.Reason) > maxReasonText {
			return nil, ErrReason
		}
		dst = append(dst, byte(in.Refusal), byte(len(in.Reason)))
		return append(dst, in.Reason...), nil
	case InnerKeyAck:
		if in.Ack&0x7fffffff == 0 {
			return nil, ErrEncodeArg
		}
		return binary.BigEndian.AppendUint32(dst, in.Ack), nil
	}
	return nil, ErrEncodeArg
}

// ParseInner decodes a sealed plaintext.
func ParseInner(b []byte) (Inner, error) {
	r := reader{b: b}
	in := Inner{Type: InnerType(r.u8())}
	switch in.Type {
	case InnerRekeyNotice:
		in.Rekey = &RekeyNotice{Reason: r.u8()}
		in.Rekey.Deadline = time.Duration(r.u32()) * time.Second
	case InnerRekeyRequest:
		in.Request = &RekeyRequest{SPI: r.u32(), IV: r.u64()}
		copy(in.Request.ICV[:], r.take(16))
	case InnerKeyDelivery:
		g, err := parseGrant(&r)
		if err != nil {
			return Inner{}, wrap(ErrInner, err)
		}
		return Inner{Type: in.Type, Keys: g}, nil
	case InnerClose:
		in.Close = r.u8()
	case InnerRefused:
		in.Refusal = Refusal(r.u8())
		in.Reason = string(r.take(int(r.u8())))
		if r.err == nil && (in.Refusal == 0 || in.Refusal > maxRefusal) {
			r.fail(ErrType)
		}
	case InnerKeyAck:
		in.Ack = r.u32()
		if r.err == nil && in.Ack&0x7fffffff == 0 {
			r.fail(ErrIndex)
		}
	default:
		if r.err == nil {
			r.fail(ErrType)
		}
	}
	if err := r.done(); err != nil {
		return Inner{}, wrap(ErrInner, err)
	}
	return in, nil
}
