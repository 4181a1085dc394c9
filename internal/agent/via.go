package agent

import (
	"net"
	"net/netip"

	"github.com/enclavekeys/enclave/internal/control"
)

// datagrams is how the data path reads and writes the data port: in
// batches straight to the peers (batcher), or through a relay gateway
// (via).
type datagrams interface {
	read(bufs [][]byte, sizes, segs []int, srcs []netip.AddrPort) (int, error)
	write(bufs [][]byte, dsts []netip.AddrPort) (int, error)
}

// dataIO returns the data path's reader or writer for up to n datagrams a
// call.
func (a *Agent) dataIO(n int) (datagrams, error) {
	if a.cfg.Via.IsValid() {
		return newVia(a.data, a.cfg.Via), nil
	}
	return newBatcher(a.data, n)
}

// via carries datagrams through a relay gateway (gateway --relay): each
// goes to the relay with the relay framing naming its destination, and
// comes back with it naming its origin (control.PutRelayHeader). The rest
// of the agent sees the peers' own endpoints. Datagrams from anyone but
// the relay are dropped. One via serves one goroutine.
type via struct {
	c       *net.UDPConn
	relay   netip.AddrPort
	scratch []byte
}

func newVia(c *net.UDPConn, relay netip.AddrPort) *via {
	return &via{c: c, relay: relay, scratch: make([]byte, control.MaxRelayHeader+65535)}
}

// read receives one relayed datagram into bufs[0], without its framing,
// and reports its origin as the source.
func (v *via) read(bufs [][]byte, sizes, segs []int, srcs []netip.AddrPort) (int, error) {
	for {
		n, src, err := v.c.ReadFromUDPAddrPort(bufs[0])
		if err != nil {
			return 0, err
		}
		origin, hl, ok := v.unwrap(bufs[0][:n], src)
		if !ok {
			continue
		}
		copy(bufs[0], bufs[0][hl:n])
		sizes[0], segs[0], srcs[0] = n-hl, 0, origin
		return 1, nil
	}
}

// unwrap checks that msg came from the relay with a good framing.
func (v *via) unwrap(msg []byte, src netip.AddrPort) (netip.AddrPort, int, bool) {
	if netip.AddrPortFrom(src.Addr().Unmap(), src.Port()) != v.relay {
		return netip.AddrPort{}, 0, false
	}
	origin, hl, err := control.ParseRelayHeader(msg)
	if err != nil {
		return netip.AddrPort{}, 0, false
	}
	return origin, hl, true
}

// write sends each datagram to the relay, framed with its destination.
func (v *via) write(bufs [][]byte, dsts []netip.AddrPort) (int, error) {
	sent := 0
	var last error
	for i, buf := range bufs {
		if err := v.writeOne(v.scratch, buf, dsts[i]); err != nil {
			last = err
			continue
		}
		sent++
	}
	return sent, last
}

func (v *via) writeOne(scratch, buf []byte, dst netip.AddrPort) error {
	hl, err := control.PutRelayHeader(scratch, dst)
	if err != nil {
		return err
	}
	n := copy(scratch[hl:], buf)
	_, err = v.c.WriteToUDPAddrPort(scratch[:hl+n], v.relay)
	return err
}

// writeTo sends one datagram on conn c to dst: straight, or through the
// relay (a rare path: it allocates its framing buffer).
func (a *Agent) writeTo(c *net.UDPConn, msg []byte, dst netip.AddrPort) error {
	if !a.cfg.Via.IsValid() {
		_, err := c.WriteToUDPAddrPort(msg, dst)
		return err
	}
	relay := a.cfg.Via
	if c == a.ctrl {
		relay = controlEndpoint(relay)
	}
	v := &via{c: c, relay: relay}
	return v.writeOne(make([]byte, control.MaxRelayHeader+len(msg)), msg, dst)
}

// fromRelay unwraps a control datagram that came through the relay: the
// message and its origin. Without a relay it returns them as they are.
func (a *Agent) fromRelay(msg []byte, src netip.AddrPort) ([]byte, netip.AddrPort, bool) {
	if !a.cfg.Via.IsValid() {
		return msg, src, true
	}
	v := via{relay: controlEndpoint(a.cfg.Via)}
	origin, hl, ok := v.unwrap(msg, src)
	if !ok {
		return nil, src, false
	}
	return msg[hl:], origin, true
}
