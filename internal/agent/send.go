package agent

import (
	"net/netip"

	"github.com/enclavekeys/enclave/internal/packet"
)

// readTUN is the send path: inner packets from the network stack, sealed
// under the SA to their destination and sent to its data endpoint. A
// packet with no SA yet waits (bounded) while one is made.
func (a *Agent) readTUN() {
	batch := a.tun.BatchSize()
	room := packet.HeaderLen + a.cfg.MTU + packet.TagLen
	bufs := make([][]byte, batch)
	for i := range bufs {
		bufs[i] = make([]byte, room)
	}
	sizes := make([]int, batch)
	for {
		n, err := a.tun.Read(bufs, sizes, packet.HeaderLen)
		if err != nil {
			return
		}
		for i := 0; i < n; i++ {
			a.send(bufs[i], sizes[i])
		}
	}
}

// send seals the inner packet at buf[HeaderLen:HeaderLen+n] in place and
// sends it.
func (a *Agent) send(buf []byte, n int) {
	inner := buf[packet.HeaderLen : packet.HeaderLen+n]
	dst, next, ok := ipDestination(inner)
	if !ok {
		a.metrics.drop("not_ip")
		return
	}
	a.mu.RLock()
	c := a.t.route[dst]
	a.mu.RUnlock()
	if c == nil {
		a.queue(dst, inner)
		return
	}
	pkt, err := c.out.Seal(buf[:packet.Overhead+n], next, inner)
	if err != nil {
		a.metrics.drop("seal")
		return
	}
	if _, err := a.data.WriteToUDPAddrPort(pkt, c.dataEndpoint()); err != nil {
		a.metrics.drop("underlay_send")
		return
	}
	a.metrics.sentPackets.Inc()
	a.metrics.sentBytes.Add(float64(n))
	if !c.server && c.out.NeedsRekey() && c.rekeying.CompareAndSwap(false, true) {
		a.rekey(c, "IV threshold")
	}
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
