package agent

import (
	"errors"
	"net/netip"
	"os"

	"github.com/enclavekeys/enclave/internal/packet"
)

// sendBatch is one batch of the send path: the inner packets read from
// the network stack, sealed in place, and where each goes.
type sendBatch struct {
	bufs    [][]byte
	sizes   []int
	pkts    [][]byte
	dsts    []netip.AddrPort
	n, size int // sealed packets, and their inner bytes
}

// pipelineDepth batches circulate between the two stages of each path, so
// that one stage works on a batch while the other works on the next.
const pipelineDepth = 3

// readTUN is the send path's first stage: batches of inner packets from
// the network stack (TCP segmentation already split by the TUN device),
// each sealed in place under the SA to its destination, passed in order
// to writeData. A packet with no SA yet waits (bounded) while one is made.
func (a *Agent) readTUN() {
	batch := a.tun.BatchSize()
	// Room for the largest packet a TUN device can hand over, whatever
	// its MTU has been set to since: a packet over the tunnel's MTU gets
	// a router's answer, not a failed read. (Only the bytes written become
	// resident memory.)
	room := packet.HeaderLen + 65535 + packet.TagLen
	free, full := make(chan *sendBatch, pipelineDepth), make(chan *sendBatch, pipelineDepth)
	for range pipelineDepth {
		b := &sendBatch{bufs: make([][]byte, batch), sizes: make([]int, batch), pkts: make([][]byte, batch), dsts: make([]netip.AddrPort, batch)}
		for i := range b.bufs {
			b.bufs[i] = make([]byte, room)
		}
		free <- b
	}
	w, err := a.dataIO(batch)
	if err != nil {
		a.log.Error("data port", "err", err)
		return
	}
	a.spawn(func() { a.writeData(w, full, free) })
	defer close(full)
	for {
		b := <-free
		n, err := a.tun.Read(b.bufs, b.sizes, packet.HeaderLen)
		if err != nil {
			if errors.Is(err, os.ErrClosed) || a.ctx.Err() != nil {
				free <- b
				return
			}
			a.metrics.drop("stack_read") // a packet the device could not hand over
		}
		b.n, b.size = 0, 0
		for i := 0; i < n; i++ {
			if pkt, dst, ok := a.seal(b.bufs[i], b.sizes[i]); ok {
				b.pkts[b.n], b.dsts[b.n] = pkt, dst
				b.n++
				b.size += b.sizes[i]
			}
		}
		full <- b
	}
}

// writeData is the send path's second stage: each sealed batch sent with
// one system call (or a few), in the order sealed.
func (a *Agent) writeData(w datagrams, full <-chan *sendBatch, free chan<- *sendBatch) {
	for b := range full {
		if b.n > 0 {
			sent, err := w.Write(b.pkts[:b.n], b.dsts[:b.n])
			if err != nil {
				a.metrics.drops.WithLabelValues("underlay_send").Add(float64(b.n - sent))
			}
			a.metrics.sentPackets.Add(float64(sent))
			a.metrics.sentBytes.Add(float64(b.size * sent / b.n))
		}
		free <- b
	}
}

// send seals the inner packet at buf[HeaderLen:HeaderLen+n] in place and
// sends it on its own (packets that waited for their SA).
func (a *Agent) send(buf []byte, n int) {
	pkt, dst, ok := a.seal(buf, n)
	if !ok {
		return
	}
	if err := a.writeTo(a.data, pkt, dst); err != nil {
		a.metrics.drop("underlay_send")
		return
	}
	a.metrics.sentPackets.Inc()
	a.metrics.sentBytes.Add(float64(n))
}

// seal seals the inner packet at buf[HeaderLen:HeaderLen+n] in place
// under the SA to its destination, and returns the PSP packet and where
// to send it. Without an SA the packet is queued (and ok is false).
func (a *Agent) seal(buf []byte, n int) (pkt []byte, dst netip.AddrPort, ok bool) {
	inner := buf[packet.HeaderLen : packet.HeaderLen+n]
	to, next, ok := ipDestination(inner)
	if !ok {
		a.metrics.drop("not_ip")
		return nil, dst, false
	}
	if n > a.cfg.MTU {
		a.oversize(inner)
		return nil, dst, false
	}
	a.mu.RLock()
	c := a.t.route[to]
	a.mu.RUnlock()
	if c == nil {
		a.queue(to, inner)
		return nil, dst, false
	}
	pkt, err := c.out.Seal(buf[:packet.Overhead+n], next, inner)
	if err != nil {
		a.metrics.drop("seal")
		return nil, dst, false
	}
	c.txPackets.Add(1)
	c.txBytes.Add(uint64(n))
	if now := a.coarse.Load(); c.lastSent.Load() != now {
		c.lastSent.Store(now)
	}
	if !c.server && c.out.NeedsRekey() && c.rekeying.CompareAndSwap(false, true) {
		a.rekey(c, "IV threshold")
	}
	return pkt, c.dataEndpoint(), true
}

// ipDestination reads an inner packet's destination and the PSP next
// header for it (4 for IPv4, 41 for IPv6).
func ipDestination(p []byte) (netip.Addr, uint8, bool) {
	if len(p) < 1 {
		return netip.Addr{}, 0, false
	}
	switch p[0] >> 4 {
	case 4:
		if len(p) < 20 {
			return netip.Addr{}, 0, false
		}
		return netip.AddrFrom4([4]byte(p[16:20])), packet.NextIPv4, true
	case 6:
		if len(p) < 40 {
			return netip.Addr{}, 0, false
		}
		return netip.AddrFrom16([16]byte(p[24:40])), packet.NextIPv6, true
	}
	return netip.Addr{}, 0, false
}

// ipSource reads an inner packet's source address.
func ipSource(p []byte) (netip.Addr, bool) {
	if len(p) < 1 {
		return netip.Addr{}, false
	}
	switch p[0] >> 4 {
	case 4:
		if len(p) < 20 {
			return netip.Addr{}, false
		}
		return netip.AddrFrom4([4]byte(p[12:16])), true
	case 6:
		if len(p) < 40 {
			return netip.Addr{}, false
		}
		return netip.AddrFrom16([16]byte(p[8:24])), true
	}
	return netip.Addr{}, false
}

// oversize does with an inner packet larger than the MTU what a router
// would (see icmp.go): fragments it, or answers it with an ICMP error.
func (a *Agent) oversize(inner []byte) {
	switch tooBig(inner) {
	case tooBigFragment:
		ok := fragment(inner, a.cfg.MTU, func(f []byte) {
			buf := make([]byte, packet.Overhead+len(f)) // a rare path: the stack's MTU is the tunnel's
			copy(buf[packet.HeaderLen:], f)
			a.send(buf, len(f))
		})
		if !ok {
			a.metrics.drop("too_big")
			return
		}
		a.metrics.fragmented.Inc()
	case tooBigICMP:
		a.metrics.drop("too_big")
		if !a.icmp.allow(a.cfg.Now()) {
			return
		}
		// From the unreachable destination: the tunnel has no router
		// address of its own, and one from this device's own address
		// would be dropped by its stack as a martian.
		src, _, _ := ipDestination(inner)
		buf := make([]byte, packet.HeaderLen+icmpv6Max)
		msg := icmpTooBig(buf[packet.HeaderLen:], inner, src, a.cfg.MTU)
		if _, err := a.tun.Write([][]byte{buf[:packet.HeaderLen+len(msg)]}, packet.HeaderLen); err != nil {
			a.metrics.drop("stack")
			return
		}
		a.metrics.icmpSent.Inc()
	default:
		a.metrics.drop("too_big")
	}
}
