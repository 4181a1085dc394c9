package gateway

import (
	"fmt"
	"time"

	"github.com/enclavekeys/enclave/internal/gsosize"
	"github.com/enclavekeys/enclave/internal/nfqueue"
)

// The inline front end: on a Linux router, an iptables rule sends the
// forwarded data and control packets to netfilter queues
//
//	iptables-legacy -A FORWARD -p udp -m multiport --ports 1000,1001 \
//	    -j NFQUEUE --queue-balance 0:1 [--queue-bypass]
//
// and one goroutine per queue judges them in the order queued, answering a
// batch with as few verdicts as it can (one for a run of packets passed as
// they came, one each for a tagged handshake or a drop), so that nothing
// is lost or reordered by the gateway itself. Several queues spread the
// work over the cores (the kernel keeps a flow on one queue).
//
// The queues take segmentation-offloaded packets whole (NFQA_CFG_F_GSO):
// a run of PSP datagrams an agent sent as one comes up as one packet, is
// cut at the segment size the kernel will cut it at (the run-size
// program puts it in the packet's mark, internal/gsosize), every datagram
// judged, and the run given one verdict, so a run costs one netlink round
// trip, not one per datagram. Where the program cannot run, the queues
// are bound without GSO and the kernel cuts every run before queueing
// its datagrams one by one: slower, as exact.

// queueRunner is one queue's loop.
type queueRunner interface {
	run()
	close()
}

type inlineQueue struct {
	g    *Gateway
	q    *nfqueue.Queue
	pkts []nfqueue.Packet
	w    *worker
	// next is the packet id expected next: ids grow by one per packet
	// queued, so a gap is a packet the queue could not hand over.
	next uint32
	// clearMark: the packet judged last carried its run's size in its
	// mark, which its verdict sets back to 0.
	clearMark bool
}

func openQueues(g *Gateway, nums []uint16, failOpen bool) ([]queueRunner, error) {
	// The queues first: a gateway that cannot bind them says so before
	// anything else; then whether they take runs whole.
	var out []queueRunner
	for _, n := range nums {
		q, err := nfqueue.Open(nfqueue.Config{Num: n, FailOpen: failOpen, GSO: true})
		if err != nil {
			for _, o := range out {
				o.close()
			}
			return nil, fmt.Errorf("gateway: %w", err)
		}
		w := newWorker()
		out = append(out, &inlineQueue{g: g, q: q, pkts: make([]nfqueue.Packet, 64), w: w})
	}
	if !g.startRunSizes() {
		for _, o := range out {
			if err := o.(*inlineQueue).q.SetGSO(false); err != nil {
				for _, o := range out {
					o.close()
				}
				return nil, fmt.Errorf("gateway: %w", err)
			}
		}
	}
	if n, err := newRawNudger(); err != nil {
		msg := "the gateway cannot tell the client of an SA it cannot read to make a new one (raw sockets need CAP_NET_RAW)"
		if g.cfg.NoDerive {
			msg += ": after a restart, every running SA of a granted pair stays held until its client makes a new one on its own, up to the SA's lifetime (an hour by default)"
		}
		g.log.Warn(msg, "err", err, "what to do", "give the gateway CAP_NET_RAW (the systemd unit does)")
	} else {
		g.nudge, g.rawNudger = n.nudge, n
	}
	return out, nil
}

func (iq *inlineQueue) close() { iq.q.Close() }

func (iq *inlineQueue) run() {
	g := iq.g
	for {
		n, err := iq.q.Read(iq.pkts)
		if err != nil {
			if g.ctx.Err() != nil {
				return
			}
			g.log.Warn("netfilter queue read", "queue", iq.q.Num(), "err", err)
			select {
			case <-g.ctx.Done():
				return
			case <-time.After(100 * time.Millisecond):
			}
			continue
		}
		iq.w.now = g.cfg.Now()
		var run uint32
		pending := false
		for i := range iq.pkts[:n] {
			p := &iq.pkts[i]
			if iq.next != 0 && p.ID > iq.next {
				// Never let a batch verdict pass a packet nobody judged:
				// the missing ones get the failure verdict first.
				if pending {
					iq.q.VerdictUpTo(run, nfqueue.Accept)
					pending = false
				}
				iq.q.VerdictUpTo(p.ID-1, iq.failVerdict())
				g.metrics.dataN("unseen", float64(p.ID-iq.next))
			}
			iq.next = p.ID + 1
			iq.clearMark = false
			v, payload := iq.judge(p)
			if v == nfqueue.Accept && payload == nil && !iq.clearMark {
				run, pending = p.ID, true
				continue
			}
			if pending {
				iq.q.VerdictUpTo(run, nfqueue.Accept)
				pending = false
			}
			var err error
			if iq.clearMark {
				err = iq.q.VerdictMark(p.ID, v, 0)
			} else {
				err = iq.q.Verdict(p.ID, v, payload)
			}
			if err != nil {
				iq.q.Verdict(p.ID, iq.failVerdict(), nil)
			}
		}
		if pending {
			iq.q.VerdictUpTo(run, nfqueue.Accept)
		}
		if err := iq.q.Flush(); err != nil && g.ctx.Err() == nil {
			g.log.Warn("netfilter queue verdicts", "queue", iq.q.Num(), "err", err)
		}
	}
}

// failVerdict is what happens to a packet the gateway failed on.
func (iq *inlineQueue) failVerdict() nfqueue.Verdict {
	if iq.g.cfg.FailOpen {
		return nfqueue.Accept
	}
	return nfqueue.Drop
}

// ours reports whether a packet goes to or comes from the data or control
// port.
func (iq *inlineQueue) ours(u *udpPacket) bool {
	dp, cp := iq.g.cfg.DataPort, iq.g.cfg.DataPort+1
	return u.dst.Port() == dp || u.src.Port() == dp || u.dst.Port() == cp || u.src.Port() == cp
}

// judge decides one queued packet: a verdict, and a new payload for a
// tagged handshake.
func (iq *inlineQueue) judge(p *nfqueue.Packet) (nfqueue.Verdict, []byte) {
	g, w := iq.g, iq.w
	if p.Length > len(p.Payload) { // cut by the copy range: never judged blind
		g.metrics.data("failed")
		return iq.failVerdict(), nil
	}
	switch err := parseUDP(&w.u, p.Payload); err {
	case nil:
	case errNotUDP:
		g.metrics.data("not_udp")
		return nfqueue.Accept, nil
	case errFragment, errExtHeader:
		// A fragmented datagram of the data or control port, or one
		// behind IPv6 extension headers, cannot be judged whole here:
		// fail closed (dropping the first fragment loses the whole
		// datagram). Other ports' pass.
		if iq.ours(&w.u) {
			g.metrics.data("fragment_dropped")
			return nfqueue.Drop, nil
		}
		return nfqueue.Accept, nil
	case errLaterFragment:
		return nfqueue.Accept, nil // nothing without its first fragment
	default:
		g.metrics.data("malformed")
		return nfqueue.Drop, nil
	}
	u := &w.u
	dp, cp := g.cfg.DataPort, g.cfg.DataPort+1
	switch {
	case u.dst.Port() == dp || u.src.Port() == dp:
		if p.GSO {
			return iq.judgeRun(p, u), nil
		}
		if g.onData(w, u.payload, u.src, u.dst) {
			return nfqueue.Accept, nil
		}
		return nfqueue.Drop, nil
	case u.dst.Port() == cp || u.src.Port() == cp:
		if p.GSO {
			// Agents send control messages one by one: a run of them is
			// no agent's, and one verdict cannot tag each.
			g.metrics.data("gso_control")
			return nfqueue.Drop, nil
		}
		out, ok := g.onControl(u.payload, w.tag, u.src, u.dst)
		if !ok {
			return nfqueue.Drop, nil
		}
		if len(out) == len(u.payload) && &out[0] == &u.payload[0] {
			return nfqueue.Accept, nil
		}
		pkt, err := rebuildUDP(w.ip, p.Payload, u, out)
		if err != nil {
			g.metrics.data("failed")
			return iq.failVerdict(), nil
		}
		return nfqueue.Accept, pkt
	}
	return nfqueue.Accept, nil // not ours: the rule should not have sent it
}

// judgeRun gives a segmentation-offloaded run of data packets its one
// verdict (the kernel cuts it only after the verdict): accepted when
// every datagram, cut at the run's real segment size, passed onRun; else
// dropped whole. A run whose size the mark does not carry is dropped
// unread: no guess from its bytes is sound.
func (iq *inlineQueue) judgeRun(p *nfqueue.Packet, u *udpPacket) nfqueue.Verdict {
	size, ok := gsosize.Size(p.Mark)
	if !ok {
		iq.g.runSizes.unknown(iq.g, p.Mark)
		return nfqueue.Drop
	}
	if u.short {
		// The kernel cuts the whole IP payload into datagrams, whatever
		// the UDP length says: a run whose UDP length leaves bytes out
		// would deliver datagrams the gateway never saw. No sender of
		// ours makes one.
		iq.g.metrics.run("malformed", 0)
		return nfqueue.Drop
	}
	iq.clearMark = true
	if iq.g.onRun(iq.w, u.payload, size, u.src, u.dst) {
		return nfqueue.Accept
	}
	return nfqueue.Drop
}
