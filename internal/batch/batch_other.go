//go:build !linux

package batch

import (
	"net"
	"net/netip"
)

// Conn, where recvmmsg and sendmmsg are missing, moves one datagram per
// system call behind the same interface as on Linux.
type Conn struct{ c *net.UDPConn }

func New(c *net.UDPConn, _ int) (*Conn, error) { return &Conn{c: c}, nil }

// Read receives one datagram into bufs[0] (never a coalesced run: segs[0]
// is 0).
func (b *Conn) Read(bufs [][]byte, sizes, segs []int, srcs []netip.AddrPort) (int, error) {
	n, src, err := b.c.ReadFromUDPAddrPort(bufs[0])
	if err != nil {
		return 0, err
	}
	sizes[0], segs[0], srcs[0] = n, 0, netip.AddrPortFrom(src.Addr().Unmap(), src.Port())
	return 1, nil
}

// Write sends the datagrams bufs[i] to dsts[i], skipping one the socket
// refuses; it returns how many went and the last error.
func (b *Conn) Write(bufs [][]byte, dsts []netip.AddrPort) (int, error) {
	sent := 0
	var last error
	for i, buf := range bufs {
		if _, err := b.c.WriteToUDPAddrPort(buf, dsts[i]); err != nil {
			last = err
			continue
		}
		sent++
	}
	return sent, last
}

// Offloads reports that there are none.
func (b *Conn) Offloads() (gso, gro bool) { return false, false }
