package agent

import (
	"errors"
	"net/netip"
	"time"

	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/control"
	"github.com/enclavekeys/enclave/internal/handshake"
	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/packet"
	"github.com/enclavekeys/enclave/internal/sa"
)

// readControl serves the control port: initiations (a server answers),
// responses and cookie replies (to this agent's initiations), and sealed
// messages of established sessions.
func (a *Agent) readControl() {
	buf := make([]byte, control.MaxMessage+1)
	for {
		n, src, err := a.ctrl.ReadFromUDPAddrPort(buf)
		if err != nil {
			return
		}
		// A socket bound to 0.0.0.0 is dual-stack: IPv4 senders come as
		// ::ffff:a.b.c.d, which no endpoint of ours is written as (the
		// data path unmaps too). Unmatched, an UnknownSA was ignored and
		// a restarted server never recovered (issue 32 review).
		src = netip.AddrPortFrom(src.Addr().Unmap(), src.Port())
		msg, src, ok := a.fromRelay(buf[:n], src)
		if !ok {
			a.metrics.drop("control_not_relayed")
			continue
		}
		h, err := control.ParseHeader(msg)
		if err != nil {
			a.metrics.drop("control_malformed")
			continue
		}
		switch h.Type {
		case control.TypeInitiation:
			a.onInitiation(src, msg)
		case control.TypeResponse:
			a.onResponse(src, msg)
		case control.TypeCookieReply:
			a.onCookie(msg)
		case control.TypeSealed:
			a.onSealed(src, msg)
		case control.TypeUnknownSA:
			a.onUnknownSAHint(src, msg)
		case control.TypeEntry:
			a.onEntry(src, msg)
		}
	}
}

// onEntry keeps a gateway's path entry that travelled apart from the
// handshake it belongs to (docs/PROTOCOL.md, "Path record"), for the
// handshake's stub; only a server decides enclaves from path records.
func (a *Agent) onEntry(src netip.AddrPort, msg []byte) {
	e, err := control.ParseEntryMessage(msg)
	if err != nil {
		a.metrics.drop("control_malformed")
		return
	}
	if !a.server || a.disc == nil {
		a.metrics.drop("control_unexpected")
		return
	}
	if !a.disc.AddDetached(e, src.Addr(), a.cfg.Now()) {
		a.metrics.drop("control_rate_limited")
	}
}

// onCookie answers a cookie reply: the initiation again, with mac2.
func (a *Agent) onCookie(msg []byte) {
	echo, cookie, err := control.ParseCookieReply(msg)
	if err != nil {
		a.metrics.drop("control_malformed")
		return
	}
	a.mu.Lock()
	d := a.pending[echo]
	if d != nil {
		d.msg = a.cfg.decorate(d.init.WithCookie(cookie))
		d.sent = a.cfg.Now()
	}
	a.mu.Unlock()
	if d == nil {
		a.metrics.drop("control_unknown_session")
		return
	}
	a.metrics.handshake("initiator", "cookie", "")
	a.sendControl(d.msg, controlEndpoint(d.route.Endpoint))
}

// onResponse completes one of this agent's handshakes: the responder must
// be a server whose certificate carries the overlay address routed to.
func (a *Agent) onResponse(src netip.AddrPort, msg []byte) {
	resp, err := control.ParseResponse(msg)
	if err != nil {
		a.metrics.drop("control_malformed")
		return
	}
	a.mu.Lock()
	d := a.pending[resp.Receiver]
	a.mu.Unlock()
	if d == nil {
		a.metrics.drop("control_unknown_session")
		return
	}
	// The handshake stays pending until a Response authenticates: one
	// that does not (forged, garbled, from another party) is dropped and
	// counted, and the real one may still come (or the timers try again).
	res, err := d.init.Complete(msg, a.cfg.Now())
	if err != nil {
		a.metrics.drop("control_response_unauthenticated")
		a.mu.Lock()
		d.answerErr = err
		a.mu.Unlock()
		return
	}
	a.mu.Lock()
	if a.pending[resp.Receiver] == d {
		delete(a.pending, resp.Receiver)
	}
	a.mu.Unlock()
	if err := a.checkResponder(res, d); err != nil {
		a.metrics.handshake("initiator", "failed", reasonOf(err))
		a.log.Warn("handshake failed", "peer", d.dst, "err", err)
		a.fail(d)
		return
	}
	p := res.Payload
	if p.Session {
		a.metrics.handshake("initiator", "failed", "session")
		a.log.Warn("the responder answered with a session and no SA", "peer", res.Peer.Identity.Name)
		a.fail(d)
		return
	}
	if p.Grant == nil {
		a.metrics.handshake("initiator", "refused", p.Refusal.String())
		a.log.Warn("SA refused", "peer", res.Peer.Identity.Name, "code", p.Refusal.String(), "reason", p.Reason)
		a.fail(d)
		return
	}
	c, err := a.clientConn(res, d, src)
	if err != nil {
		a.metrics.handshake("initiator", "failed", "grant")
		a.log.Warn("unusable grant", "peer", res.Peer.Identity.Name, "err", err)
		a.fail(d)
		return
	}
	if d.replaces != nil && !c.expires.After(d.replaces.expires.Add(time.Second)) {
		// The server could not give a longer life (its key ends, and the
		// key service has not given it the next one yet: an outage across
		// a rotation). Making SAs again at every tick would only storm it:
		// this one waits for the server's notice, or an UnknownSA.
		c.rekeying.Store(true)
	}
	a.mu.Lock()
	if a.dials[d.dst] == d {
		delete(a.dials, d.dst)
	}
	a.t.add(c, a.cfg.Now())
	queued := d.queue
	expires := c.expires
	a.mu.Unlock()
	a.metrics.handshake("initiator", "ok", "")
	a.metrics.sas.Set(float64(a.SAs()))
	a.log.Info("SA up", "peer", res.Peer.Identity.Name, "vc", c.vc.String(), "generation", c.gen, "expires", expires)
	for _, inner := range queued {
		buf := make([]byte, packet.Overhead+len(inner))
		copy(buf[packet.HeaderLen:], inner)
		a.send(buf, len(inner))
	}
	if len(queued) == 0 {
		a.keepalive(c) // the server sends on the new SA from now on
	}
}

// fail forgets a dial whose handshake failed or was refused.
func (a *Agent) fail(d *dial) {
	a.mu.Lock()
	if a.dials[d.dst] == d {
		delete(a.dials, d.dst)
	}
	if d.replaces != nil {
		a.rekeyFailedLocked(d.replaces, a.cfg.Now())
	}
	a.mu.Unlock()
}

// checkResponder: the responder is a server of the org, holding the
// overlay address the packets were routed to.
func (a *Agent) checkResponder(res *handshake.Result, d *dial) error {
	id := res.Peer.Identity
	switch {
	case id.Role != ca.RoleServer:
		return errWrongRole
	case !id.Overlay.IsValid():
		return errWrongOverlay
	case d.anyIn.IsValid() && !d.anyIn.Contains(id.Overlay.Addr()):
		return errWrongOverlay
	case !d.anyIn.IsValid() && id.Overlay.Addr() != d.dst:
		return errWrongOverlay
	case a.isRevoked(id.Name):
		return errRevoked
	}
	return nil
}

var (
	errWrongRole    = errors.New("agent: the responder is not a server")
	errWrongOverlay = errors.New("agent: the responder's certificate does not carry the overlay address routed to")
	errRevoked      = errors.New("agent: the peer is revoked")
	errGrant        = errors.New("agent: the grant does not fit its VC")
)

// clientConn makes the client side of a granted SA.
func (a *Agent) clientConn(res *handshake.Result, d *dial, src netip.AddrPort) (*conn, error) {
	g := res.Payload.Grant
	v := keys.Version(g.PSPVersion)
	vc := keys.VC{Enclave: keys.EnclaveID(g.Enclave), Peer: keys.EnclaveID(g.Peer), Server: keys.ServerID(g.Server)}
	id := res.Peer.Identity
	if vc.Enclave != id.Enclave || !id.HasServerID || vc.Server != id.ServerID {
		return nil, errGrant
	}
	out, err := sa.NewOutbound(sa.Config{SPI: keys.SPI(g.SPIOut), VC: vc, Version: v, Key: g.KeyOut, RekeyAfter: a.cfg.RekeyAfter})
	if err != nil {
		return nil, err
	}
	in, err := sa.NewInbound(sa.Config{SPI: keys.SPI(g.SPIIn), VC: vc, Version: v, Key: g.KeyIn})
	if err != nil {
		return nil, err
	}
	now := a.cfg.Now()
	c := &conn{peer: id, overlay: id.Overlay.Addr(), vc: vc, gen: keys.Generation(g.Generation),
		recvSPI: keys.SPI(g.SPIIn), sendSPI: keys.SPI(g.SPIOut), out: out, in: in, session: res.Session,
		created: now, expires: now.Add(g.Lifetime)}
	a.capAtCerts(c, res.Peer.Expires)
	c.setControl(src)
	c.setEndpoint(d.route.Endpoint)
	return c, nil
}

// onSealed handles a sealed message of an established session.
func (a *Agent) onSealed(src netip.AddrPort, msg []byte) {
	s, err := control.ParseSealed(msg)
	if err != nil {
		a.metrics.drop("control_malformed")
		return
	}
	a.mu.RLock()
	c := a.t.bySession[s.Receiver]
	gs := a.gws[s.Receiver]
	a.mu.RUnlock()
	if c == nil && gs != nil {
		a.onGatewaySealed(gs, &s)
		return
	}
	if c == nil {
		a.metrics.drop("control_unknown_session")
		return
	}
	in, err := c.session.Open(&s)
	if err != nil {
		a.metrics.drop("control_" + reasonOf(err))
		return
	}
	switch in.Type {
	case control.InnerRekeyNotice:
		// The server asks: make a new SA unless one is being made now
		// (rekey checks; the flag alone may be left from an attempt that
		// ended without one, and the server asks again when it must).
		if !c.server {
			c.rekeying.Store(true)
			a.rekey(c, "asked by the server")
		}
	case control.InnerClose:
		a.log.Info("SA closed by peer", "peer", c.peer.Name)
		a.drop(c)
	}
}

// drop removes an SA.
func (a *Agent) drop(c *conn) {
	a.mu.Lock()
	a.t.remove(c)
	n := len(a.t.bySPI)
	a.mu.Unlock()
	a.metrics.sas.Set(float64(n))
}

// reasonOf names a handshake error as a metric label.
func reasonOf(err error) string {
	switch {
	case errors.Is(err, handshake.ErrCert):
		return "certificate"
	case errors.Is(err, handshake.ErrSignature):
		return "signature"
	case errors.Is(err, handshake.ErrNoise):
		return "noise"
	case errors.Is(err, handshake.ErrClock):
		return "clock"
	case errors.Is(err, handshake.ErrPayload), errors.Is(err, control.ErrPayload):
		return "payload"
	case errors.Is(err, errWrongRole):
		return "role"
	case errors.Is(err, errWrongOverlay):
		return "overlay"
	case errors.Is(err, errRevoked):
		return "revoked"
	case errors.Is(err, handshake.ErrSessionReplay):
		return "replay"
	case errors.Is(err, handshake.ErrSessionAuth):
		return "auth"
	}
	return "other"
}
