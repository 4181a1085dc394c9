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
	errFragment = errors.New("gateway: an IP fragment")
	errIPHeader = errors.New("gateway: malformed IP header")
)

// udpPacket is an outer IP packet carrying UDP: where its parts are.
type udpPacket struct {
	v6       bool
	src, dst netip.AddrPort
	ipLen    int // the IP header's length (IPv4 options included)
	payload  []byte
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
		if binary.BigEndian.Uint16(pkt[6:])&0x3fff != 0 { // MF or a fragment offset
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
	return nil
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
// UDP headers of unfragmented (or first-fragment) packets; other
// protocols have none (0).
func innerTuple(t *tuple, p []byte) bool {
	if len(p) < 1 {
		return false
	}
	var l4 []byte
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
		}
	case 6:
		if len(p) < 40 {
			return false
		}
		t.proto = p[6]
		t.src, t.dst = netip.AddrFrom16([16]byte(p[8:24])), netip.AddrFrom16([16]byte(p[24:40]))
		l4 = p[40:]
	default:
		return false
	}
	t.srcPort, t.dstPort = 0, 0
	switch t.proto {
	case protoTCP, protoUDP:
		if len(l4) >= 4 {
			t.srcPort, t.dstPort = binary.BigEndian.Uint16(l4), binary.BigEndian.Uint16(l4[2:])
		}
	}
	return true
}
