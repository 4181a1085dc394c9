package gateway

import (
	"errors"
	"net/netip"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/enclavekeys/enclave/internal/packet"
	"github.com/enclavekeys/enclave/internal/registry"
	"github.com/enclavekeys/enclave/internal/sa"
)

// worker is one front-end goroutine's scratch space: the packet parsed,
// the inner packet decrypted into a buffer of its own (the packet
// forwarded is never touched), a tagged handshake, a rebuilt IP packet.
// Allocated once per goroutine: the data path allocates nothing per
// packet.
type worker struct {
	p     packet.Parsed
	inner []byte
	tag   []byte
	ip    []byte
	u     udpPacket
	t     tuple
	segs  [][]byte // the datagrams of a run
	// fromAgent: the worker judges what a relay's agents send it.
	fromAgent bool
	// now is the time of the batch being judged, read once per batch
	// (reading the clock per datagram is a tenth of a run's cost).
	now time.Time
	// The last pair's counters, so that a run of one pair looks them up
	// once.
	pair         registry.Pair
	read, opaque prometheus.Counter
	flow         flowHint
}

// counters returns the read and opaque counters of pair p.
func (w *worker) counters(m *Metrics, p registry.Pair) (read, opaque prometheus.Counter) {
	if w.read == nil || w.pair != p {
		w.pair, w.read, w.opaque = p, m.pair(p, "read"), m.pair(p, "opaque")
	}
	return w.read, w.opaque
}

func newWorker() *worker {
	return &worker{inner: make([]byte, 0, 65535), tag: make([]byte, 0, 4096+1024), ip: make([]byte, 0, 65535), segs: make([][]byte, 0, maxRunSegments)}
}

// onData judges a data packet on its way from src to dst, at w.now, and
// reports whether it goes on. A packet of a pair the gateway reads is opened (the
// pair key through the opener and its cache, or the SA's key from direct
// key exchange) and its inner packet inspected: the flow is counted and
// logged, policy decides, the capture gets it. A packet it cannot read
// passes untouched, counted as opaque by pair (and, in a granted pair,
// kept as a proof for a late join). A forged or malformed one is
// dropped: its endpoint would drop it too; so is a PSP packet without a
// VC in the clear (no_vc), which no key of the gateway's opens.
func (g *Gateway) onData(w *worker, pkt []byte, src, dst netip.AddrPort) bool {
	var inner []byte
	err := sa.ErrNoKey
	if !g.cfg.NoDerive {
		inner, err = g.opener.OpenInto(w.inner[:0], &w.p, pkt)
	} else if perr := packet.Parse(&w.p, pkt); perr != nil {
		err = perr
	}
	if errors.Is(err, sa.ErrNoKey) || errors.Is(err, sa.ErrGeneration) {
		if key := g.dkx.get(saKey{w.p.VC, w.p.SPI}); key != nil {
			inner, err = packet.Open(w.inner[:0], &w.p, key)
		}
	}
	pair := registry.NewPair(w.p.VC.Enclave, w.p.VC.Peer)
	switch {
	case err == nil:
	case errors.Is(err, sa.ErrNoKey), errors.Is(err, sa.ErrGeneration):
		_, opaque := w.counters(g.metrics, pair)
		if !g.keys.isGranted(pair) {
			g.metrics.data("opaque")
			opaque.Inc()
			return true
		}
		// A granted pair's SA the gateway cannot read (blind.go).
		g.amp.received(dst.Addr(), len(pkt)) // a late join's session goes there
		k := saKey{w.p.VC, w.p.SPI}
		nudge := g.late.observe(k, src.Addr(), dst, w.p.IV, pkt[len(pkt)-packet.TagLen:], w.now)
		if g.cfg.FailOpen {
			// Passed unread, as the operator chose: late join gets the
			// keys (latejoin.go).
			g.metrics.data("opaque")
			opaque.Inc()
			return true
		}
		if nudge && g.nudge != nil && (g.cfg.NoDerive || errors.Is(err, sa.ErrNoKey)) {
			// Charged to the sender: the client, when it is the one
			// sending (the other end, a server, ignores nudges).
			if g.blind.nudgeAllowed(src.Addr(), w.now) {
				g.nudge(src, dst, uint32(w.p.SPI), w.fromAgent)
				g.late.nudged(k, w.now)
				g.metrics.data("nudged")
			} else {
				g.metrics.data("nudge_limited")
			}
		}
		g.blind.held(pair, w.now)
		g.metrics.data("held")
		return false
	case errors.Is(err, packet.ErrAuth):
		g.metrics.data("forged")
		return false
	case errors.Is(err, packet.ErrNoVC):
		// A PSP packet without a VC in the clear (another PSP sender's):
		// no key derives from it, so nothing can judge it.
		g.metrics.data("no_vc")
		return false
	default:
		g.metrics.data("malformed")
		return false
	}
	if len(inner) == 0 {
		// A keepalive (an agent telling its peer it holds the SA):
		// authenticated, carrying nothing to judge.
		g.metrics.data("keepalive")
		return true
	}
	if !innerTuple(&w.t, inner) {
		g.metrics.data("inner_malformed")
		return false
	}
	v := g.flows.packet(&w.t, pair, w.p.VC, w.p.SPI, len(inner), w.now, &w.flow)
	if g.capture != nil {
		g.capture.write(inner, w.p.VC, w.p.SPI, v)
	}
	if v == Deny {
		g.metrics.data("denied")
		return false
	}
	g.metrics.dataRead.Inc()
	read, _ := w.counters(g.metrics, pair)
	read.Inc()
	if d := g.blind.read(pair, w.now); d > 0 {
		g.metrics.blindWindow.Observe(d.Seconds())
		g.log.Info("the gateway reads a pair it held packets of again", "pair", pair.String(), "held_for", d.Round(time.Millisecond))
	}
	return true
}
