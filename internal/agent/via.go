package agent

import (
	"net"
	"net/netip"

	"github.com/enclavekeys/enclave/internal/batch"
	"github.com/enclavekeys/enclave/internal/control"
)

// datagrams is how the data path reads and writes the data port: in
// batches straight to the peers (batch.Conn), or through a relay gateway
// (via).
type datagrams interface {
	Read(bufs [][]byte, sizes, segs []int, srcs []netip.AddrPort) (int, error)
	Write(bufs [][]byte, dsts []netip.AddrPort) (int, error)
}

// dataIO returns the data path's reader or writer for up to n datagrams a
// call.
func (a *Agent) dataIO(n int) (datagrams, error) {
	c, err := batch.New(a.data, n)
	if err != nil {
		return nil, err
	}
	if a.cfg.Via.IsValid() {
		return newVia(c, a.cfg.Via, n), nil
	}
	return c, nil
}

// via carries datagrams through a relay gateway (gateway --relay): each
// goes to the relay with the relay framing naming its destination, and
// comes back with it naming its origin (control.PutRelayHeader). The rest
// of the agent sees the peers' own endpoints. Datagrams from anyone but
// the relay are dropped. Framed datagrams of one size go to the relay as
// offloaded runs, and runs the relay sends back are read whole, so a run
// crosses the relay as one message each way. One via serves one
// goroutine.
type via struct {
	c     *batch.Conn
	relay netip.AddrPort

	// The write side: each datagram framed in a buffer of its own (grown
	// once to the largest datagram seen), all to the relay.
	framed [][]byte
	out    [][]byte
	relays []netip.AddrPort

	// The read side: the messages the last read brought, handed over
	// from message msg at offset off (a message may need several of the
	// caller's buffers: a run the kernel coalesced may hold datagrams of
	// several origins).
	in          [][]byte
	sizes, segs []int
	srcs        []netip.AddrPort
	n, msg, off int
}

// viaMessages is how many messages a via reads at once: each may be a
// run of up to 64 datagrams.
const viaMessages = 8

func newVia(c *batch.Conn, relay netip.AddrPort, n int) *via {
	v := &via{c: c, relay: relay, framed: make([][]byte, n), out: make([][]byte, n), relays: make([]netip.AddrPort, n)}
	for i := range v.relays {
		v.relays[i] = relay
	}
	return v
}

// Read receives relayed datagrams into bufs without their framing, each
// message one origin's datagrams (a run where several of one size
// follow), and reports the origins as the sources.
func (v *via) Read(bufs [][]byte, sizes, segs []int, srcs []netip.AddrPort) (int, error) {
	if v.in == nil {
		v.in = make([][]byte, viaMessages)
		for i := range v.in {
			v.in[i] = make([]byte, 65535)
		}
		v.sizes, v.segs, v.srcs = make([]int, viaMessages), make([]int, viaMessages), make([]netip.AddrPort, viaMessages)
	}
	for {
		if v.msg >= v.n {
			n, err := v.c.Read(v.in, v.sizes, v.segs, v.srcs)
			if err != nil {
				return 0, err
			}
			v.n, v.msg, v.off = n, 0, 0
		}
		out := 0
		for out < len(bufs) && v.msg < v.n {
			if w, seg, origin := v.next(bufs[out]); w > 0 {
				sizes[out], segs[out], srcs[out] = w, seg, origin
				out++
			}
		}
		if out > 0 {
			return out, nil
		}
	}
}

// next copies into buf the datagrams of the message being handed over
// that follow on one origin as a run (all of one size but the last, which
// may be shorter), unframed, and returns their bytes, the run's segment
// size (0 for one datagram) and the origin. Datagrams that are not the
// relay's, or badly framed, are dropped.
func (v *via) next(buf []byte) (int, int, netip.AddrPort) {
	m := v.in[v.msg][:v.sizes[v.msg]]
	from := v.srcs[v.msg]
	seg := v.segs[v.msg]
	if seg <= 0 {
		seg = len(m)
	}
	var origin netip.AddrPort
	w, size := 0, 0
	if netip.AddrPortFrom(from.Addr().Unmap(), from.Port()) != v.relay {
		v.off = len(m)
	}
	for v.off < len(m) {
		d := m[v.off:min(v.off+seg, len(m))]
		o, hl, err := control.ParseRelayHeader(d)
		if err != nil || len(d) == hl {
			v.off += len(d)
			continue
		}
		body := d[hl:]
		if w > 0 && (o != origin || len(body) > size || w+len(body) > len(buf)) {
			break
		}
		if w == 0 {
			if len(body) > len(buf) {
				v.off += len(d)
				continue
			}
			origin, size = o, len(body)
		}
		w += copy(buf[w:], body)
		v.off += len(d)
		if len(body) < size {
			break // a short datagram ends a run
		}
	}
	if v.off >= len(m) {
		v.msg, v.off = v.msg+1, 0
	}
	if w == size {
		size = 0
	}
	return w, size, origin
}

// Write sends each datagram to the relay, framed with its destination;
// framed datagrams of one size go as offloaded runs.
func (v *via) Write(bufs [][]byte, dsts []netip.AddrPort) (int, error) {
	n := min(len(bufs), len(v.framed))
	m := 0
	var last error
	for i := 0; i < n; i++ {
		need := control.MaxRelayHeader + len(bufs[i])
		if cap(v.framed[i]) < need {
			v.framed[i] = make([]byte, need)
		}
		f := v.framed[i][:cap(v.framed[i])]
		hl, err := control.PutRelayHeader(f, dsts[i])
		if err != nil {
			last = err
			continue
		}
		v.out[m] = f[:hl+copy(f[hl:], bufs[i])]
		m++
	}
	sent, err := v.c.Write(v.out[:m], v.relays[:m])
	if err == nil {
		err = last
	}
	return sent, err
}

// writeOne sends one datagram to the relay on c, framed with dst, using
// scratch for the framing.
func writeOne(c *net.UDPConn, relay netip.AddrPort, scratch, buf []byte, dst netip.AddrPort) error {
	hl, err := control.PutRelayHeader(scratch, dst)
	if err != nil {
		return err
	}
	n := copy(scratch[hl:], buf)
	_, err = c.WriteToUDPAddrPort(scratch[:hl+n], relay)
	return err
}

// unwrap checks that msg came from the relay with a good framing, and
// returns its origin and the framing's length.
func unwrap(relay netip.AddrPort, msg []byte, src netip.AddrPort) (netip.AddrPort, int, bool) {
	if netip.AddrPortFrom(src.Addr().Unmap(), src.Port()) != relay {
		return netip.AddrPort{}, 0, false
	}
	origin, hl, err := control.ParseRelayHeader(msg)
	if err != nil {
		return netip.AddrPort{}, 0, false
	}
	return origin, hl, true
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
	return writeOne(c, relay, make([]byte, control.MaxRelayHeader+len(msg)), msg, dst)
}

// fromRelay unwraps a control datagram that came through the relay: the
// message and its origin. Without a relay it returns them as they are.
func (a *Agent) fromRelay(msg []byte, src netip.AddrPort) ([]byte, netip.AddrPort, bool) {
	if !a.cfg.Via.IsValid() {
		return msg, src, true
	}
	origin, hl, ok := unwrap(controlEndpoint(a.cfg.Via), msg, src)
	if !ok {
		return nil, src, false
	}
	return msg[hl:], origin, true
}
