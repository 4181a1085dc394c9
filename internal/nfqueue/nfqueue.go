// Package nfqueue is a client of the kernel's netfilter queue
// (nfnetlink_queue): packets an iptables rule sends to `-j NFQUEUE` come
// up to this process, which answers each with a verdict (accept, drop, or
// accept with a new payload). It is the inline gateway's packet source
// (DESIGN §7) and nothing else: no policy, no parsing beyond the netlink
// framing.
//
// Setup (binding the queue, copy mode, flags) goes through
// github.com/mdlayher/netlink with acknowledged requests; the packet path
// reads batches with recvmmsg into buffers allocated once and sends a
// batch's verdicts in one datagram, so it allocates nothing per packet.
// The message framing (this file) is portable and fuzzed; the socket is
// Linux only.
package nfqueue

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Errors of the queue.
var (
	// ErrUnsupported: netfilter queues exist only on Linux.
	ErrUnsupported = errors.New("nfqueue: netfilter queues need Linux")
	// ErrMalformed: a message from the kernel did not parse (counted and
	// skipped by Read; a packet without an id cannot be given a verdict).
	ErrMalformed = errors.New("nfqueue: malformed netlink message")
	// ErrFull: the verdict buffer has no room for another verdict; Flush
	// first.
	ErrFull = errors.New("nfqueue: verdict buffer full")
	// ErrPayload: a replacement payload is larger than a packet can be.
	ErrPayload = errors.New("nfqueue: replacement payload too large")
)

// Netlink and nfnetlink_queue constants (linux/netlink.h,
// linux/netfilter/nfnetlink.h, linux/netfilter/nfnetlink_queue.h).
const (
	nlmsgHdrLen   = 16
	nlmsgError    = 2
	nlmsgDone     = 3
	nlmFRequest   = 1
	nfgenHdrLen   = 4
	nfnlSubsysQ   = 3
	msgPacket     = nfnlSubsysQ << 8
	msgVerdict    = nfnlSubsysQ<<8 | 1
	msgConfig     = nfnlSubsysQ<<8 | 2
	msgBatch      = nfnlSubsysQ<<8 | 3
	attrPacketHdr = 1
	attrVerdict   = 2
	attrMark      = 3
	attrInDev     = 5
	attrOutDev    = 6
	attrPayload   = 10
	attrCapLen    = 13
	attrSkbInfo   = 14
	attrTypeMask  = 0x3fff // without NLA_F_NESTED and NLA_F_NET_BYTEORDER

	cfgCmd     = 1
	cfgParams  = 2
	cfgMaxLen  = 3
	cfgMask    = 4
	cfgFlags   = 5
	cmdBind    = 1
	copyPacket = 2
	flagFail   = 1 << 0
	flagGSO    = 1 << 2

	// NFQA_SKB_INFO bits.
	skbCsumNotReady = 1 << 0
	skbGSO          = 1 << 1
)

// Verdict is what happens to a queued packet.
type Verdict uint32

// The verdicts used.
const (
	Drop   Verdict = 0
	Accept Verdict = 1
)

// Packet is one queued packet. Payload starts at the network header (an
// IPv4 or IPv6 packet on the IP hooks) and aliases the queue's receive
// buffer: it is valid until the next Read.
type Packet struct {
	ID uint32
	// Protocol is the link-layer protocol (0x0800 IPv4, 0x86dd IPv6).
	Protocol uint16
	// Hook is the netfilter hook the packet was queued at (2 = FORWARD).
	Hook          uint8
	Mark          uint32
	InDev, OutDev uint32
	// Length is the packet's length; Payload may be shorter if the copy
	// range cut it (never with the default range).
	Length  int
	Payload []byte
	// GSO: the packet is a segmentation-offloaded run the kernel has not
	// cut into the packets the wire will carry (only on a queue opened
	// with Config.GSO). Its IP and transport headers are those of the
	// whole run, and the kernel cuts it after the verdict.
	GSO bool
	// ChecksumNotReady: the transport checksum is not filled in yet (a
	// device will, or the kernel after the verdict); do not check it.
	ChecksumNotReady bool
}

// parsePacket parses one netlink message holding a queued packet. It
// returns ErrMalformed for anything that is not one, and the kernel's
// error for an NLMSG_ERROR carrying one.
func parsePacket(p *Packet, msg []byte) error {
	if len(msg) < nlmsgHdrLen {
		return ErrMalformed
	}
	n := int(binary.NativeEndian.Uint32(msg))
	if n < nlmsgHdrLen || n > len(msg) {
		return ErrMalformed
	}
	typ := binary.NativeEndian.Uint16(msg[4:])
	body := msg[nlmsgHdrLen:n]
	switch typ {
	case msgPacket:
	case nlmsgError:
		if len(body) >= 4 {
			if code := int32(binary.NativeEndian.Uint32(body)); code != 0 {
				return fmt.Errorf("nfqueue: kernel error %d", -code)
			}
		}
		return ErrMalformed
	default:
		return ErrMalformed
	}
	if len(body) < nfgenHdrLen {
		return ErrMalformed
	}
	*p = Packet{}
	var hdr bool
	for a := body[nfgenHdrLen:]; len(a) > 0; {
		if len(a) < 4 {
			return ErrMalformed
		}
		l := int(binary.NativeEndian.Uint16(a))
		if l < 4 || l > len(a) {
			return ErrMalformed
		}
		t, v := binary.NativeEndian.Uint16(a[2:])&attrTypeMask, a[4:l]
		switch t {
		case attrPacketHdr:
			if len(v) < 7 {
				return ErrMalformed
			}
			p.ID = binary.BigEndian.Uint32(v)
			p.Protocol = binary.BigEndian.Uint16(v[4:])
			p.Hook = v[6]
			hdr = true
		case attrMark:
			if len(v) >= 4 {
				p.Mark = binary.BigEndian.Uint32(v)
			}
		case attrInDev:
			if len(v) >= 4 {
				p.InDev = binary.BigEndian.Uint32(v)
			}
		case attrOutDev:
			if len(v) >= 4 {
				p.OutDev = binary.BigEndian.Uint32(v)
			}
		case attrPayload:
			p.Payload = v
		case attrCapLen:
			if len(v) >= 4 {
				p.Length = int(binary.BigEndian.Uint32(v))
			}
		case attrSkbInfo:
			if len(v) >= 4 {
				info := binary.BigEndian.Uint32(v)
				p.GSO = info&skbGSO != 0
				p.ChecksumNotReady = info&skbCsumNotReady != 0
			}
		}
		al := (l + 3) &^ 3
		if al > len(a) {
			al = len(a)
		}
		a = a[al:]
	}
	if !hdr {
		return ErrMalformed
	}
	if p.Length < len(p.Payload) {
		p.Length = len(p.Payload)
	}
	return nil
}

// messageLen is the length of the netlink message at the start of b.
func messageLen(b []byte) (int, bool) {
	if len(b) < nlmsgHdrLen {
		return 0, false
	}
	n := int(binary.NativeEndian.Uint32(b))
	return n, n >= nlmsgHdrLen && n <= len(b)
}

// maxPayload is the largest payload a verdict may carry (an IP packet).
const maxPayload = 65535

// noMark: a verdict that leaves the packet's mark as it is.
const noMark = -1

// appendVerdict appends one verdict message to b: for packet id, or, with
// batch, for every packet of the queue up to and including id; with mark
// other than noMark, the packet's mark becomes uint32(mark).
func appendVerdict(b []byte, queue uint16, v Verdict, id uint32, batch bool, payload []byte, mark int64) ([]byte, error) {
	if len(payload) > maxPayload {
		return b, ErrPayload
	}
	typ := uint16(msgVerdict)
	if batch {
		typ = msgBatch
	}
	n := nlmsgHdrLen + nfgenHdrLen + 12
	if mark != noMark {
		n += 8
	}
	if payload != nil {
		n += 4 + (len(payload)+3)&^3
	}
	start := len(b)
	b = binary.NativeEndian.AppendUint32(b, uint32(n))
	b = binary.NativeEndian.AppendUint16(b, typ)
	b = binary.NativeEndian.AppendUint16(b, nlmFRequest)
	b = binary.NativeEndian.AppendUint32(b, 0) // seq: verdicts are not acknowledged
	b = binary.NativeEndian.AppendUint32(b, 0)
	b = append(b, 0, 0) // AF_UNSPEC, NFNETLINK_V0
	b = binary.BigEndian.AppendUint16(b, queue)
	b = binary.NativeEndian.AppendUint16(b, 12)
	b = binary.NativeEndian.AppendUint16(b, attrVerdict)
	b = binary.BigEndian.AppendUint32(b, uint32(v))
	b = binary.BigEndian.AppendUint32(b, id)
	if mark != noMark {
		b = binary.NativeEndian.AppendUint16(b, 8)
		b = binary.NativeEndian.AppendUint16(b, attrMark)
		b = binary.BigEndian.AppendUint32(b, uint32(mark))
	}
	if payload != nil {
		b = binary.NativeEndian.AppendUint16(b, uint16(4+len(payload)))
		b = binary.NativeEndian.AppendUint16(b, attrPayload)
		b = append(b, payload...)
		for len(b)-start < n {
			b = append(b, 0)
		}
	}
	return b, nil
}

// configMessage is the body of a queue configuration request: the
// nfgenmsg header for the queue, then the attributes.
func configMessage(queue uint16, attrs ...[]byte) []byte {
	b := []byte{0, 0} // AF_UNSPEC, NFNETLINK_V0
	b = binary.BigEndian.AppendUint16(b, queue)
	for _, a := range attrs {
		b = append(b, a...)
	}
	return b
}

// attr encodes one netlink attribute with padding.
func attr(t uint16, v []byte) []byte {
	b := binary.NativeEndian.AppendUint16(nil, uint16(4+len(v)))
	b = binary.NativeEndian.AppendUint16(b, t)
	b = append(b, v...)
	for len(b)%4 != 0 {
		b = append(b, 0)
	}
	return b
}

func be32(v uint32) []byte { return binary.BigEndian.AppendUint32(nil, v) }
