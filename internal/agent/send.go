package agent

import (
	"net/netip"

	"github.com/enclavekeys/enclave/internal/packet"
)

// readTUN is the send path: batches of inner packets from the network
// stack (TCP segmentation already split by the TUN device), each sealed in
// place under the SA to its destination, then sent with one system call
// per batch. A packet with no SA yet waits (bounded) while one is made.
func (a *Agent) readTUN() {
	batch := a.tun.BatchSize()
	room := packet.HeaderLen + a.cfg.MTU + packet.TagLen
	bufs := make([][]byte, batch)
	for i := range bufs {
		bufs[i] = make([]byte, room)
	}
	sizes := make([]int, batch)
	pkts := make([][]byte, batch)
	dsts := make([]netip.AddrPort, batch)
	w, err := newBatcher(a.data, batch)
	if err != nil {
		a.log.Error("data port", "err", err)
		return
	}
	for {
		n, err := a.tun.Read(bufs, sizes, packet.HeaderLen)
		if err != nil {
			return
		}
		m, bytes := 0, 0
		for i := 0; i < n; i++ {
			if pkt, dst, ok := a.seal(bufs[i], sizes[i]); ok {
				pkts[m], dsts[m] = pkt, dst
				m++
				bytes += sizes[i]
			}
		}
		if m == 0 {
			continue
		}
		sent, err := w.write(pkts[:m], dsts[:m])
		if err != nil {
			a.metrics.drops.WithLabelValues("underlay_send").Add(float64(m - sent))
			bytes = bytes * sent / m // close enough for a counter of a failure case
		}
		a.metrics.sentPackets.Add(float64(sent))
		a.metrics.sentBytes.Add(float64(bytes))
	}
}

// send seals the inner packet at buf[HeaderLen:HeaderLen+n] in place and
// sends it on its own (packets that waited for their SA).
func (a *Agent) send(buf []byte, n int) {
	pkt, dst, ok := a.seal(buf, n)
	if !ok {
		return
	}
	if _, err := a.data.WriteToUDPAddrPort(pkt, dst); err != nil {
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
