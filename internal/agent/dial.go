package agent

import (
	crand "crypto/rand"
	"encoding/binary"
	"math/rand/v2"
	"net/netip"
	"time"

	"github.com/enclavekeys/enclave/internal/control"
	"github.com/enclavekeys/enclave/internal/handshake"
)

// dial is a handshake the agent started as a client: to a destination it
// routes to, or to replace an SA (rekey).
type dial struct {
	dst      netip.Addr
	route    Route
	init     *handshake.Initiator
	msg      []byte // the initiation as last sent
	sent     time.Time
	tries    int
	queue    [][]byte // inner packets waiting for the SA
	replaces *conn    // the SA this one replaces, if a rekey
	// resolving: the destination is being looked up in the directory (no
	// route, no initiation yet; directory.go).
	resolving bool
	// anyIn: a recovery dial to an endpoint (recoverFrom), whose server
	// may be any with an overlay address in this prefix (dst is then the
	// prefix's network address, a key of the dials and nobody's address).
	anyIn netip.Prefix
	// answerErr is why the last answer to this handshake did not
	// authenticate (an expired certificate, say): the timeout says so
	// instead of blaming the path (under a.mu).
	answerErr error
}

// newIndex returns a random non-zero session index unused by this agent
// (called under a.mu).
func (a *Agent) newIndex() uint32 {
	for {
		var b [4]byte
		crand.Read(b[:])
		i := binary.BigEndian.Uint32(b[:])
		if i == 0 || a.pending[i] != nil || a.t.bySession[i] != nil {
			continue
		}
		return i
	}
}

// queue keeps an inner packet for dst while an SA is made, starting the
// handshake when none is in flight. Without a route to dst the packet is
// dropped.
func (a *Agent) queue(dst netip.Addr, inner []byte) {
	if a.selfRevoked.Load() {
		a.metrics.drop("revoked")
		return
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	d := a.dials[dst]
	if d == nil {
		r, ok := a.routeFor(dst)
		switch {
		case ok:
			d = &dial{dst: dst, route: r}
			a.dials[dst] = d
			a.startLocked(d)
		case a.resolvable(dst) && a.cfg.Now().Sub(a.failed[dst]) >= failedFor:
			// Not routed here: ask the directory; the packets wait as
			// for a handshake.
			d = &dial{dst: dst, resolving: true}
			a.dials[dst] = d
			go a.resolve(d)
		default:
			a.metrics.drop("no_route")
			return
		}
	}
	if len(d.queue) >= maxQueued {
		a.metrics.drop("queue_full")
		return
	}
	d.queue = append(d.queue, append([]byte(nil), inner...))
}

// startLocked sends a fresh initiation for d (called under a.mu).
func (a *Agent) startLocked(d *dial) {
	if d.init != nil {
		delete(a.pending, d.init.Sender())
	}
	idx := a.newIndex()
	init, msg, err := handshake.Initiate(a.creds.Load(), idx, a.cfg.Now())
	if err != nil {
		a.metrics.handshake("initiator", "failed", "initiate")
		return
	}
	d.init, d.msg, d.sent = init, a.cfg.decorate(msg), a.cfg.Now()
	a.warnHandshakeSize(len(d.msg))
	d.tries++
	a.pending[idx] = d
	a.sendControl(d.msg, controlEndpoint(d.route.Endpoint))
}

// warnHandshakeSize says in the log, once, when this agent's initiations
// leave the gateways on a path room for fewer than two entries within a
// packet of 1,280 bytes (control.MaxHandshake): handshakes never rely on
// IP fragmentation, so a gateway that has no room passes them untagged
// and cannot place the client in its enclave.
func (a *Agent) warnHandshakeSize(n int) {
	if n+2*control.StubLen <= control.MaxHandshake || !a.sizeWarned.CompareAndSwap(false, true) {
		return
	}
	what := "give this device a certificate with a shorter chain (issued by the org CA itself, or with fewer names), or name its enclave in the certificate"
	if n > control.MaxHandshake {
		a.log.Warn("this agent's initiations are larger than a 1280-byte packet holds: paths with a smaller MTU drop them, and no gateway can tag them", "bytes", n, "max", control.MaxHandshake, "what to do", what)
		return
	}
	a.log.Warn("this agent's initiations leave gateways on the path room for fewer than two entries within a 1280-byte packet", "bytes", n, "max", control.MaxHandshake, "entries", (control.MaxHandshake-n)/control.StubLen, "what to do", what)
}

// rekey starts a handshake that will replace c, which keeps working until
// the new SA is up (make before break).
func (a *Agent) rekey(c *conn, why string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if c.closed.Load() || a.dials[c.overlay] != nil {
		return
	}
	r, ok := a.routeFor(c.overlay)
	if !ok {
		r = Route{Prefix: netip.PrefixFrom(c.overlay, c.overlay.BitLen()), Endpoint: c.dataEndpoint()}
	}
	a.log.Info("rekey", "peer", c.peer.Name, "why", why)
	d := &dial{dst: c.overlay, route: r, replaces: c}
	a.dials[c.overlay] = d
	a.startLocked(d)
}

// Backoff of a rekey that failed: tried again after retryFirst, doubling
// up to retryMax, each wait drawn from its upper half so that clients cut
// off together do not come back together.
const (
	retryFirst = time.Second
	retryMax   = 30 * time.Second
)

// rekeyFailedLocked: the handshake that was to replace c failed (no
// answer, refused, or answered by no one trusted). c carries on, and the
// rekey is tried again after a backoff, until one succeeds or c ends:
// whoever asked for it (the server's notice, an UnknownSA, c's age) may
// not ask again (called under a.mu).
func (a *Agent) rekeyFailedLocked(c *conn, now time.Time) {
	c.rekeying.Store(false)
	if c.server || c.closed.Load() {
		return
	}
	c.backoff = min(max(2*c.backoff, retryFirst), retryMax)
	wait := c.backoff/2 + rand.N(c.backoff/2+1)
	c.retryAt = now.Add(wait).UnixNano()
	if c.slot != 0 {
		a.t.schedule(c, min(c.due, c.retryAt))
	}
	a.metrics.recovery.WithLabelValues("rekey_retry_scheduled").Inc()
	a.log.Warn("rekey failed: the SA carries on, and the rekey is tried again", "peer", c.peer.Name, "generation", c.gen, "in", wait.Round(time.Millisecond).String())
}

// controlEndpoint is the control port beside a data endpoint.
func controlEndpoint(data netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(data.Addr(), data.Port()+1)
}

// sendControl writes a control datagram.
func (a *Agent) sendControl(msg []byte, to netip.AddrPort) {
	if err := a.writeTo(a.ctrl, msg, to); err != nil {
		a.metrics.drop("underlay_send")
	}
}
