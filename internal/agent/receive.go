package agent

import (
	"encoding/binary"
	"errors"
	"net"
	"net/netip"

	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/packet"
	"github.com/enclavekeys/enclave/internal/sa"
)

// recvBatch is one batch of the receive path: opened inner packets, each
// in a buffer of its own with room for the TUN device to coalesce a
// flow's packets into the first.
type recvBatch struct {
	room [][]byte
	out  [][]byte
	size int // inner bytes
}

// readData is the receive path's first stage: batches of PSP packets from
// the data port (one system call per batch; a run the kernel coalesced is
// split here), each opened in place under its SA (the client's own CK, or
// the server's key through the stateless opener and the SA's replay
// window) and checked to come from the peer's overlay address, then
// passed in order to writeTUN.
func (a *Agent) readData() {
	const messages, packets = 32, 64
	r, err := a.dataIO(messages)
	if err != nil {
		a.log.Error("data port", "err", err)
		return
	}
	bufs := make([][]byte, messages) // room for a coalesced run
	for i := range bufs {
		bufs[i] = make([]byte, 65535)
	}
	sizes, segs := make([]int, messages), make([]int, messages)
	srcs := make([]netip.AddrPort, messages)
	// A kernel TUN device coalesces a flow's packets into the first one's
	// buffer, so those have room for 64 KiB; the in-process stack takes
	// packets of the MTU.
	size := packet.HeaderLen + a.cfg.MTU
	if a.cfg.TUN != "" {
		size = 65535
	}
	free, full := make(chan *recvBatch, pipelineDepth), make(chan *recvBatch, pipelineDepth)
	for range pipelineDepth {
		b := &recvBatch{room: make([][]byte, packets), out: make([][]byte, 0, packets)}
		for i := range b.room {
			b.room[i] = make([]byte, size)
		}
		free <- b
	}
	a.rx.Add(1)
	a.spawn(func() { defer a.rx.Done(); a.writeTUN(full, free) })
	defer close(full)
	var p packet.Parsed
	for {
		n, err := r.Read(bufs, sizes, segs, srcs)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			a.metrics.drop("underlay_receive")
			continue
		}
		b := <-free
		for i := 0; i < n; i++ {
			msg := bufs[i][:sizes[i]]
			seg := segs[i]
			if seg <= 0 {
				seg = len(msg)
			}
			for len(msg) > 0 {
				pkt := msg[:min(seg, len(msg))]
				msg = msg[len(pkt):]
				// Decrypted straight into the buffer it goes to the stack
				// in, when it surely fits; else in place, then copied.
				room := b.room[len(b.out)]
				var into []byte
				if len(pkt)-packet.Overhead <= len(room)-packet.HeaderLen {
					into = room[packet.HeaderLen:packet.HeaderLen]
				}
				inner, err := a.open(into, &p, pkt, srcs[i])
				if err != nil {
					switch {
					case err == errKeepalive:
						a.metrics.keepalives.Inc()
					case err == errUnknownSA:
						a.metrics.drop("unknown_sa")
						a.onUnknownSPI(pkt, srcs[i])
					default:
						a.metrics.drop(dropCause(err))
					}
					continue
				}
				if into == nil {
					if len(inner) > len(room)-packet.HeaderLen {
						a.metrics.drop("oversize")
						continue
					}
					copy(room[packet.HeaderLen:], inner)
				}
				b.out = append(b.out, room[:packet.HeaderLen+len(inner)])
				b.size += len(inner)
				if len(b.out) == packets {
					full <- b
					b = <-free
				}
			}
		}
		full <- b
	}
}

// writeTUN is the receive path's second stage: each batch of inner
// packets handed to the network stack in one write, in the order opened,
// which lets the TUN device coalesce a flow's segments again.
func (a *Agent) writeTUN(full <-chan *recvBatch, free chan<- *recvBatch) {
	for b := range full {
		if len(b.out) > 0 {
			if _, err := a.tun.Write(b.out, packet.HeaderLen); err != nil {
				a.metrics.drop("stack")
			} else {
				a.metrics.recvPackets.Add(float64(len(b.out)))
				a.metrics.recvBytes.Add(float64(b.size))
			}
		}
		b.out, b.size = b.out[:0], 0
		free <- b
	}
}

// Receive errors of the agent's own (the packet layer's and the SA's
// have theirs).
var (
	errShort        = errors.New("agent: packet too short")
	errUnknownSA    = errors.New("agent: no SA with this SPI")
	errSpoofedInner = errors.New("agent: inner source is not the peer's overlay address")
	// errWrongDestination: an inner packet not addressed to this device's
	// overlay address (a peer handing the host's stack packets for
	// 127.0.0.1, another network or a broadcast address).
	errWrongDestination = errors.New("agent: inner destination is not this device's")
	// errKeepalive: an authenticated packet with no inner packet, which
	// tells its receiver the peer holds the SA (not a drop).
	errKeepalive = errors.New("agent: keepalive")
)

// open authenticates and decrypts one data packet and returns its inner
// packet, or why it is dropped. The inner packet is appended to dst, or,
// with a nil dst, decrypted in place.
func (a *Agent) open(dst []byte, p *packet.Parsed, pkt []byte, src netip.AddrPort) ([]byte, error) {
	if len(pkt) < packet.HeaderLen+packet.TagLen {
		return nil, errShort
	}
	spi := keys.SPI(binary.BigEndian.Uint32(pkt[4:8]))
	a.mu.RLock()
	c := a.t.bySPI[spi]
	a.mu.RUnlock()
	if c == nil {
		return nil, errUnknownSA
	}
	var inner []byte
	var err error
	if c.server {
		inner, err = a.opener.OpenInto(dst, p, pkt)
		switch {
		case err != nil:
		case p.VC != c.vc || p.SPI != c.recvSPI:
			err = sa.ErrWrongSA
		case !c.accept(p.IV, pkt[len(pkt)-packet.TagLen:], a.coarse.Load()):
			err = sa.ErrReplay
		}
	} else {
		inner, err = c.in.OpenInto(dst, p, pkt)
	}
	if err != nil {
		return nil, err
	}
	if now := a.coarse.Load(); c.lastSeen.Load() != now {
		c.lastSeen.Store(now) // once per tick of the coarse clock, not per packet
	}
	keepalive := len(inner) == 0
	if s, ok := ipSource(inner); !keepalive && (!ok || s != c.overlay) {
		return nil, errSpoofedInner
	}
	if d, _, ok := ipDestination(inner); !keepalive && (!ok || !a.deliversTo(d)) {
		return nil, errWrongDestination
	}
	c.rxPackets.Add(1)
	c.rxBytes.Add(uint64(len(inner)))
	if !c.confirmed.Load() {
		a.confirm(c) // the client sends on the new SA: the server may too
	}
	if old := c.dataEndpoint(); old != src {
		// The peer roamed (a new address, a restarted relay): an
		// authenticated packet that passed the replay window moves it.
		// Only a roaming packet allocates.
		c.setEndpoint(src)
		if c.server && c.seen.Load() {
			c.roamControl(old, src)
		}
	}
	if c.server && !c.seen.Load() {
		c.seen.Store(true)
	}
	if keepalive {
		return nil, errKeepalive
	}
	return inner, nil
}

// deliversTo reports whether an inner packet to dst is this device's to
// take: only its own overlay address (the agent routes no network behind
// it; packets for peers' prefixes would hairpin through the host).
func (a *Agent) deliversTo(dst netip.Addr) bool { return dst == a.self }

// confirm makes a server's replacing SA the route to its client, once the
// client has shown it holds it.
func (a *Agent) confirm(c *conn) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if !c.closed.Load() && !c.confirmed.Load() {
		a.t.promote(c, a.cfg.Now())
	}
}

// dropCause names a receive error as a metric label.
func dropCause(err error) string {
	switch {
	case errors.Is(err, errShort):
		return "short"
	case errors.Is(err, errUnknownSA):
		return "unknown_sa"
	case errors.Is(err, errSpoofedInner):
		return "spoofed_source"
	case errors.Is(err, errWrongDestination):
		return "wrong_destination"
	case errors.Is(err, sa.ErrReplay):
		return "replay"
	case errors.Is(err, packet.ErrAuth):
		return "auth"
	case errors.Is(err, sa.ErrWrongSA):
		return "wrong_sa"
	case errors.Is(err, sa.ErrNoKey), errors.Is(err, sa.ErrGeneration):
		return "no_key"
	}
	return packet.CauseOf(err).String()
}
