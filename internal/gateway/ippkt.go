package gateway

import (
	"encoding/binary"
	"errors"
	"net/netip"

	"github.com/enclavekeys/enclave/internal/checksum"
)

// IP and UDP headers, as the inline gateway meets them (whole IP packets
// from the netfilter queue) and as inspection reads inner packets.

var (
	errNotUDP   = errors.New("gateway: not a UDP packet")
	errIPHeader = errors.New("gateway: malformed IP header")
	// errFragment: the first fragment of a UDP datagram (its ports are
	// read into the udpPacket); errLaterFragment: a later one, which
	// cannot be reassembled without the first; errExtHeader: UDP behind
	// IPv6 extension headers (ports read), which agents never send.
	errFragment      = errors.New("gateway: the first fragment of a UDP datagram")
	errLaterFragment = errors.New("gateway: a later IP fragment")
	errExtHeader     = errors.New("gateway: UDP behind IPv6 extension headers")
)

// udpPacket is an outer IP packet carrying UDP: where its parts are.
type udpPacket struct {
	v6       bool
	src, dst netip.AddrPort
	ipLen    int // the IP header's length (IPv4 options included)
	payload  []byte
	// short: the UDP length field ends before the IP payload does. The
	// kernel gives a socket only what the field covers, but cuts a
	// segmentation-offloaded run by the whole packet's length.
	short bool
}

// parseUDP reads an IPv4 or IPv6 packet carrying a whole UDP datagram.
// Fragments, IPv6 extension headers and other protocols are refused with
// errors the caller counts (and passes: they are not ours to judge).
func parseUDP(u *udpPacket, pkt []byte) error {
	if len(pkt) < 1 {
		return errIPHeader
	}
	var proto uint8
	var total int
	switch pkt[0] >> 4 {
	case 4:
		if len(pkt) < 20 {
			return errIPHeader
		}
		ihl := int(pkt[0]&0x0f) * 4
		total = int(binary.BigEndian.Uint16(pkt[2:]))
		if ihl < 20 || total < ihl || total > len(pkt) {
			return errIPHeader
		}
		if frag := binary.BigEndian.Uint16(pkt[6:]); frag&0x3fff != 0 { // MF or a fragment offset
			if frag&0x1fff != 0 {
				return errLaterFragment
			}
			// The first fragment holds the whole UDP header (fragments
			// are cut at 8-byte boundaries): its ports say whose it is.
			u.src = netip.AddrPortFrom(netip.AddrFrom4([4]byte(pkt[12:16])), 0)
			u.dst = netip.AddrPortFrom(netip.AddrFrom4([4]byte(pkt[16:20])), 0)
			if pkt[9] != protoUDP || !readPorts(u, pkt[ihl:total]) {
				return errNotUDP
			}
			return errFragment
		}
		proto = pkt[9]
		u.v6, u.ipLen = false, ihl
		u.src = netip.AddrPortFrom(netip.AddrFrom4([4]byte(pkt[12:16])), 0)
		u.dst = netip.AddrPortFrom(netip.AddrFrom4([4]byte(pkt[16:20])), 0)
	case 6:
		if len(pkt) < 40 {
			return errIPHeader
		}
		total = 40 + int(binary.BigEndian.Uint16(pkt[4:]))
		if total > len(pkt) {
			return errIPHeader
		}
		proto = pkt[6]
		u.v6, u.ipLen = true, 40
		u.src = netip.AddrPortFrom(netip.AddrFrom16([16]byte(pkt[8:24])), 0)
		u.dst = netip.AddrPortFrom(netip.AddrFrom16([16]byte(pkt[24:40])), 0)
		if isExtension(proto) {
			next, l4, noPorts, _ := ipv6Transport(proto, pkt[40:total])
			switch {
			case noPorts && next == protoUDP:
				return errLaterFragment
			case next != protoUDP || !readPorts(u, l4):
				return errNotUDP
			}
			return errExtHeader
		}
	default:
		return errIPHeader
	}
	if proto != protoUDP {
		return errNotUDP
	}
	udp := pkt[u.ipLen:total]
	if len(udp) < 8 {
		return errIPHeader
	}
	ul := int(binary.BigEndian.Uint16(udp[4:]))
	if ul < 8 || ul > len(udp) {
		return errIPHeader
	}
	u.src = netip.AddrPortFrom(u.src.Addr(), binary.BigEndian.Uint16(udp))
	u.dst = netip.AddrPortFrom(u.dst.Addr(), binary.BigEndian.Uint16(udp[2:]))
	u.payload = udp[8:ul]
	u.short = ul != len(udp)
	return nil
}

// readPorts reads a UDP header's ports into u.
func readPorts(u *udpPacket, udp []byte) bool {
	if len(udp) < 8 {
		return false
	}
	u.src = netip.AddrPortFrom(u.src.Addr(), binary.BigEndian.Uint16(udp))
	u.dst = netip.AddrPortFrom(u.dst.Addr(), binary.BigEndian.Uint16(udp[2:]))
	return true
}

// rebuildUDP writes into dst the packet orig (parsed as u) with its UDP
// payload replaced by payload: IP and UDP lengths set, the IPv4 header
// checksum and the UDP checksum computed again (an IPv4 datagram sent
// without a UDP checksum keeps none).
func rebuildUDP(dst []byte, orig []byte, u *udpPacket, payload []byte) ([]byte, error) {
	hl := u.ipLen + 8
	total := hl + len(payload)
	if total > 65535 || (u.v6 && total-40 > 65535) {
		return nil, errIPHeader
	}
	out := append(dst[:0], orig[:hl]...)
	out = append(out, payload...)
	udp := out[u.ipLen:]
	binary.BigEndian.PutUint16(udp[4:], uint16(8+len(payload)))
	hadSum := binary.BigEndian.Uint16(orig[u.ipLen+6:]) != 0
	binary.BigEndian.PutUint16(udp[6:], 0)
	if u.v6 {
		binary.BigEndian.PutUint16(out[4:], uint16(total-40))
	} else {
		binary.BigEndian.PutUint16(out[2:], uint16(total))
		binary.BigEndian.PutUint16(out[10:], 0)
		binary.BigEndian.PutUint16(out[10:], ^checksum.Sum(0, out[:u.ipLen]))
	}
	if u.v6 || hadSum {
		c := ^checksum.Sum(pseudoSum(u, len(udp)), udp)
		if c == 0 {
			c = 0xffff // 0 means "no checksum"
		}
		binary.BigEndian.PutUint16(udp[6:], c)
	}
	return out, nil
}

// pseudoSum is the UDP pseudo-header's sum: the addresses, the protocol
// and the UDP length.
func pseudoSum(u *udpPacket, udpLen int) uint16 {
	var c uint16
	if u.v6 {
		a, b := u.src.Addr().As16(), u.dst.Addr().As16()
		c = checksum.Sum(checksum.Sum(0, a[:]), b[:])
	} else {
		a, b := u.src.Addr().As4(), u.dst.Addr().As4()
		c = checksum.Sum(checksum.Sum(0, a[:]), b[:])
	}
	tail := [4]byte{0, protoUDP, byte(udpLen >> 8), byte(udpLen)}
	return checksum.Sum(c, tail[:])
}

// innerTuple reads an inner packet's 5-tuple. Ports are read from TCP and
// UDP headers of unfragmented (or first-fragment) packets, after IPv6's
// extension headers; other protocols have none (0). A packet whose ports
// cannot be read though its protocol has them (a later fragment, a first
// fragment cut short, a header chain too long or of a kind the gateway
// does not walk) is marked noPorts: policy denies it where a port rule
// could apply.
func innerTuple(t *tuple, p []byte) bool {
	if len(p) < 1 {
		return false
	}
	var l4 []byte
	t.noPorts, t.unknown = false, false
	switch p[0] >> 4 {
	case 4:
		if len(p) < 20 {
			return false
		}
		ihl := int(p[0]&0x0f) * 4
		if ihl < 20 || ihl > len(p) {
			return false
		}
		t.proto = p[9]
		t.src, t.dst = netip.AddrFrom4([4]byte(p[12:16])), netip.AddrFrom4([4]byte(p[16:20]))
		if binary.BigEndian.Uint16(p[6:])&0x1fff == 0 { // the first fragment holds the ports
			l4 = p[ihl:]
		} else {
			t.noPorts = true
		}
	case 6:
		if len(p) < 40 {
			return false
		}
		t.src, t.dst = netip.AddrFrom16([16]byte(p[8:24])), netip.AddrFrom16([16]byte(p[24:40]))
		t.proto, l4, t.noPorts, t.unknown = ipv6Transport(p[6], p[40:])
	default:
		return false
	}
	t.srcPort, t.dstPort = 0, 0
	switch t.proto {
	case protoTCP, protoUDP:
		if len(l4) >= 4 {
			t.srcPort, t.dstPort = binary.BigEndian.Uint16(l4), binary.BigEndian.Uint16(l4[2:])
		} else if !t.noPorts {
			t.noPorts = true // a first fragment cut before its ports
		}
	}
	return true
}

// IPv6 extension headers the gateway walks (RFC 8200 §4).
const (
	ipv6HopByHop = 0
	ipv6Routing  = 43
	ipv6Fragment = 44
	ipv6AH       = 51
	ipv6DestOpts = 60
	// maxExtHeaders bounds the walk: a longer chain is not judged by port.
	maxExtHeaders = 8
)

// ipv6Transport walks an IPv6 packet's extension headers from next header
// nh over rest, and returns the transport protocol, its header's bytes,
// whether the ports cannot be read (a later fragment), and whether the
// transport protocol itself is unknown (a chain cut short, too long, or a
// later fragment whose next header is another extension header).
func ipv6Transport(nh uint8, rest []byte) (proto uint8, l4 []byte, noPorts, unknown bool) {
	for range maxExtHeaders {
		switch nh {
		case ipv6HopByHop, ipv6Routing, ipv6DestOpts, ipv6AH:
			if len(rest) < 8 {
				return nh, nil, true, true
			}
			n := (int(rest[1]) + 1) * 8
			if nh == ipv6AH {
				n = (int(rest[1]) + 2) * 4
			}
			if n > len(rest) {
				return nh, nil, true, true
			}
			nh, rest = rest[0], rest[n:]
		case ipv6Fragment:
			if len(rest) < 8 {
				return nh, nil, true, true
			}
			next, offset := rest[0], binary.BigEndian.Uint16(rest[2:])>>3
			if offset != 0 { // a later fragment: no transport header here
				return next, nil, true, isExtension(next)
			}
			nh, rest = next, rest[8:]
		default:
			return nh, rest, false, false
		}
	}
	return nh, nil, true, true
}

func isExtension(nh uint8) bool {
	switch nh {
	case ipv6HopByHop, ipv6Routing, ipv6Fragment, ipv6AH, ipv6DestOpts:
		return true
	}
	return false
}
