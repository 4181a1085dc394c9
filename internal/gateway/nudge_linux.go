package gateway

import (
	"encoding/binary"
	"errors"
	"net/netip"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/enclavekeys/enclave/internal/checksum"
	"github.com/enclavekeys/enclave/internal/control"
)

// rawNudger sends the inline gateway's nudges (blind.go): an UnknownSA
// to each end of an SA, as from the other end's control port, from raw
// sockets (the gateway is on the path, not an end: the message must come
// from the address the end sends to). It needs CAP_NET_RAW.
type rawNudger struct {
	mu       sync.Mutex
	fd4, fd6 int
	pkt      []byte
}

// newRawNudger opens the raw sockets.
func newRawNudger() (*rawNudger, error) {
	fd4, err := unix.Socket(unix.AF_INET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_RAW)
	if err != nil {
		return nil, err
	}
	fd6, err := unix.Socket(unix.AF_INET6, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_RAW)
	if err != nil {
		unix.Close(fd4)
		return nil, err
	}
	return &rawNudger{fd4: fd4, fd6: fd6, pkt: make([]byte, 0, 64)}, nil
}

// nudge sends the UnknownSA naming spi to both ends of the SA between the
// data endpoints src and dst (a server ignores it; the client acts).
func (n *rawNudger) nudge(src, dst netip.AddrPort, spi uint32, _ bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	for _, e := range [2][2]netip.AddrPort{{dst, src}, {src, dst}} {
		from := netip.AddrPortFrom(e[0].Addr(), e[0].Port()+1)
		to := netip.AddrPortFrom(e[1].Addr(), e[1].Port()+1)
		pkt, err := unknownSAPacket(n.pkt[:0], from, to, spi)
		if err != nil {
			continue
		}
		if to.Addr().Is4() {
			unix.Sendto(n.fd4, pkt, 0, &unix.SockaddrInet4{Addr: to.Addr().As4()})
		} else {
			unix.Sendto(n.fd6, pkt, 0, &unix.SockaddrInet6{Addr: to.Addr().As16()})
		}
	}
}

func (n *rawNudger) close() {
	unix.Close(n.fd4)
	unix.Close(n.fd6)
}

// errFamilies: the two ends of a nudge are of different address families.
var errFamilies = errors.New("gateway: a nudge between address families")

// unknownSAPacket is an IP packet carrying a UDP datagram from "from" to
// "to" holding an UnknownSA that names spi, appended to dst.
func unknownSAPacket(dst []byte, from, to netip.AddrPort, spi uint32) ([]byte, error) {
	if from.Addr().Is4() != to.Addr().Is4() {
		return nil, errFamilies
	}
	u := udpPacket{src: from, dst: to, v6: !to.Addr().Is4()}
	u.ipLen = 20
	if u.v6 {
		u.ipLen = 40
	}
	var msg [control.UnknownSALen]byte
	payload, err := control.AppendUnknownSA(msg[:0], spi)
	if err != nil {
		return nil, err
	}
	udpLen := 8 + len(payload)
	out := append(dst, make([]byte, u.ipLen+udpLen)...)
	ip := out[len(dst):]
	if u.v6 {
		ip[0] = 0x60
		binary.BigEndian.PutUint16(ip[4:], uint16(udpLen))
		ip[6], ip[7] = protoUDP, 64
		a, b := from.Addr().As16(), to.Addr().As16()
		copy(ip[8:], a[:])
		copy(ip[24:], b[:])
	} else {
		ip[0] = 0x45
		binary.BigEndian.PutUint16(ip[2:], uint16(u.ipLen+udpLen))
		ip[6] = 0x40 // DF
		ip[8], ip[9] = 64, protoUDP
		a, b := from.Addr().As4(), to.Addr().As4()
		copy(ip[12:], a[:])
		copy(ip[16:], b[:])
		binary.BigEndian.PutUint16(ip[10:], ^checksum.Sum(0, ip[:20]))
	}
	udp := ip[u.ipLen:]
	binary.BigEndian.PutUint16(udp[0:], from.Port())
	binary.BigEndian.PutUint16(udp[2:], to.Port())
	binary.BigEndian.PutUint16(udp[4:], uint16(udpLen))
	copy(udp[8:], payload)
	c := ^checksum.Sum(pseudoSum(&u, udpLen), udp)
	if c == 0 {
		c = 0xffff
	}
	binary.BigEndian.PutUint16(udp[6:], c)
	return out, nil
}
