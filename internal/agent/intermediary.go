package agent

import (
	"context"
	"crypto/subtle"
	"fmt"
	"net/netip"
	"time"

	"github.com/enclavekeys/enclave/internal/api"
	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/control"
	"github.com/enclavekeys/enclave/internal/discovery"
	"github.com/enclavekeys/enclave/internal/handshake"
	"github.com/enclavekeys/enclave/internal/keys"
)

// The server's side of the intermediaries (DESIGN §5.5, §5.6): a gateway
// that cannot derive an SA's keys marks the SA's handshake need-key and
// opens a control session of its own with the server (an initiation with
// its gateway certificate, answered with a session and no SA); the server
// asks the key service whether that gateway may see the pair and, if so,
// hands it the SA's keys over that session. A gateway that meets an SA
// formed before it started proves with a packet it forwarded that it is on
// the path, and the server has the client re-establish the SA through it.

const (
	// deliveryWait is how long keys wait for the gateway's session.
	deliveryWait = 10 * time.Second
	// maxGatewaySessions bounds the intermediaries' sessions a server keeps.
	maxGatewaySessions = 1024
	// maxDeliveries bounds the deliveries waiting per gateway.
	maxDeliveries = 256
	// lateJoinEvery: a gateway's rekey request re-establishes one SA at
	// most this often.
	lateJoinEvery = 10 * time.Second
	// authorizeTimeout bounds the key service's answer.
	authorizeTimeout = 5 * time.Second
	// responseHold bounds how long a grant's Response waits for the keys
	// to reach the gateways that asked for them (so that they read the
	// SA from its first packet); past it, the Response goes and the SA
	// is counted as unread by them until their keys come.
	responseHold = 2 * time.Second
)

// gwSession is an intermediary's control session with this server.
type gwSession struct {
	id      ca.Identity
	session *handshake.Session
	ctrl    netip.AddrPort
	at      time.Time
}

// ackKey names a delivery awaiting its gateway's KeyAck: the gateway and
// the SPI the SA's client sends with.
type ackKey struct {
	gateway string
	spi     uint32
}

// maxAcks bounds the deliveries awaiting an ack (each is released by
// holdResponse within responseHold anyway).
const maxAcks = 65536

// delivery is one SA's keys waiting for a gateway's session.
type delivery struct {
	grant   control.Grant
	granted time.Time
	expires time.Time
	done    func() // called once the keys went, or never will (may be nil)
}

// finish reports the delivery over (once: done is dropped after).
func (d *delivery) finish() {
	if d.done != nil {
		d.done()
		d.done = nil
	}
}

// proof is a packet an SA accepted: its IV, the first half of its ICV
// (64 bits: a guess of it succeeds once in 2^64) and when (Unix ms).
type proof struct {
	iv  uint64
	icv [8]byte
	at  int64
}

// proofRing keeps an SA's proofs of path: the latest packets, and the
// latest whose IV is a multiple of control.ProofSparse.
type proofRing struct {
	recent, sparse [control.ProofRecent]proof
	nr, ns         uint8
}

func (r *proofRing) record(iv uint64, icv []byte, now int64) {
	p := proof{iv: iv, at: now}
	copy(p.icv[:], icv)
	r.recent[r.nr%control.ProofRecent] = p
	r.nr++
	if iv%control.ProofSparse == 0 {
		r.sparse[r.ns%control.ProofRecent] = p
		r.ns++
	}
}

// holds reports whether the ring has the packet (iv, icv), accepted no
// earlier than since (Unix ms).
func (r *proofRing) holds(iv uint64, icv []byte, since int64) bool {
	found := 0
	for _, set := range [][control.ProofRecent]proof{r.recent, r.sparse} {
		for _, p := range set {
			if p.iv == iv && p.iv != 0 && p.at >= since {
				found |= subtle.ConstantTimeCompare(p.icv[:], icv[:8])
			}
		}
	}
	return found == 1
}

// onGatewayInitiation answers an intermediary's initiation: a session and
// no SA, after the same admission as any initiator (revocation, replay).
func (a *Agent) onGatewayInitiation(r *handshake.Responding, src netip.AddrPort, now time.Time) {
	id := r.Peer.Identity
	payload := control.ResponderPayload{Flags: control.FlagDirectKeyExchange, Session: true}
	if refusal, reason := a.admit(r); refusal != 0 {
		payload = control.ResponderPayload{Refusal: refusal, Reason: reason}
	}
	a.mu.Lock()
	idx := a.newIndex()
	a.mu.Unlock()
	resp, session, err := r.Finish(idx, payload)
	if err != nil {
		a.metrics.handshake("responder", "failed", "finish")
		return
	}
	if !payload.Session {
		a.metrics.intermediaries.WithLabelValues("session", "refused").Inc()
		a.log.Warn("intermediary refused", "gateway", id.String(), "code", payload.Refusal.String(), "reason", payload.Reason)
		a.sendControl(resp, src)
		return
	}
	gs := &gwSession{id: id, session: session, ctrl: src, at: now}
	a.mu.Lock()
	if len(a.gws) >= maxGatewaySessions {
		a.evictGatewayLocked()
	}
	if old := a.gwByName[id.Name]; old != nil {
		delete(a.gws, old.session.Local) // the newest session of a gateway is the one it listens on
	}
	a.gws[idx] = gs
	a.gwByName[id.Name] = gs
	waiting := a.deliveries[id.Name]
	delete(a.deliveries, id.Name)
	a.mu.Unlock()
	a.metrics.intermediaries.WithLabelValues("session", "ok").Inc()
	a.log.Info("intermediary session", "gateway", id.String(), "from", src)
	a.sendControl(resp, src)
	for _, d := range waiting {
		a.deliver(gs, d)
	}
}

// evictGatewayLocked drops the oldest intermediary session (under a.mu).
func (a *Agent) evictGatewayLocked() {
	var oldest *gwSession
	for _, g := range a.gws {
		if oldest == nil || g.at.Before(oldest.at) {
			oldest = g
		}
	}
	if oldest != nil {
		delete(a.gws, oldest.session.Local)
		if a.gwByName[oldest.id.Name] == oldest {
			delete(a.gwByName, oldest.id.Name)
		}
	}
}

// exchangeKeys is the server's side of direct key exchange for one SA it
// just granted: the key service decides whether gateway gw may see the
// pair; if so the SA's keys go to the gateway over its session (now, or
// when its session comes up); a refusal is logged and counted here,
// audited by the key service, and told to the gateway.
//
// done is called when the keys went, or never will: the grant's Response
// waits for it (see holdResponse).
func (a *Agent) exchangeKeys(gw discovery.Intermediary, g control.Grant, done func()) {
	queued := false
	defer func() {
		clear(g.KeyOut)
		clear(g.KeyIn)
		if !queued {
			done()
		}
	}()
	ctx, cancel := context.WithTimeout(a.ctx, authorizeTimeout)
	defer cancel()
	auth, err := a.cfg.KeyService.AuthorizeDirectKeyExchange(ctx, &api.AuthorizeDirectKeyExchangeRequest{
		Gateway: gw.Identity.Name, Enclave: uint32(g.Enclave), Peer: uint32(g.Peer)})
	if err != nil {
		a.metrics.intermediaries.WithLabelValues("key_exchange", "error").Inc()
		a.log.Warn("direct key exchange: the key service did not answer", "gateway", gw.Identity.Name, "err", err)
		return
	}
	if !auth.GetAllowed() {
		a.metrics.intermediaries.WithLabelValues("key_exchange", "refused").Inc()
		a.log.Warn("direct key exchange refused", "gateway", gw.Identity.Name, "pair", fmt.Sprintf("%d-%d", g.Enclave, g.Peer), "reason", auth.GetReason())
		a.refuseGateway(gw.Identity.Name, control.RefusedPolicy, auth.GetReason())
		return
	}
	now := a.cfg.Now()
	d := &delivery{grant: g, granted: now, expires: now.Add(deliveryWait), done: done}
	d.grant.KeyOut, d.grant.KeyIn = append([]byte(nil), g.KeyOut...), append([]byte(nil), g.KeyIn...)
	queued = true // the delivery reports done from here on
	a.mu.Lock()
	gs := a.gwByName[gw.Identity.Name]
	if gs == nil {
		if q := a.deliveries[gw.Identity.Name]; len(q) < maxDeliveries {
			a.deliveries[gw.Identity.Name] = append(q, d)
			d = nil
		}
	}
	a.mu.Unlock()
	switch {
	case gs != nil:
		a.deliver(gs, d)
	case d != nil: // too many waiting for a gateway that never came
		clear(d.grant.KeyOut)
		clear(d.grant.KeyIn)
		d.finish()
		a.metrics.intermediaries.WithLabelValues("key_exchange", "expired").Inc()
	}
}

// deliver sends one SA's keys over a gateway's session and forgets them.
// The grant's Response waits (holdResponse) for the gateway's KeyAck,
// which says the keys are installed.
func (a *Agent) deliver(gs *gwSession, d *delivery) {
	defer func() {
		clear(d.grant.KeyOut)
		clear(d.grant.KeyIn)
		d.finish() // nothing to wait for, unless an ack is awaited
	}()
	// The validity counts from now, as the gateway receives it.
	d.grant.Lifetime = max(d.grant.Lifetime-a.cfg.Now().Sub(d.granted), 0).Truncate(time.Second)
	msg, err := gs.session.Seal(&control.Inner{Type: control.InnerKeyDelivery, Keys: &d.grant})
	if err != nil {
		a.metrics.intermediaries.WithLabelValues("key_exchange", "error").Inc()
		return
	}
	if d.done != nil {
		a.mu.Lock()
		if len(a.acks) < maxAcks {
			a.acks[ackKey{gs.id.Name, d.grant.SPIOut}] = d.done
			d.done = nil
		}
		a.mu.Unlock()
	}
	a.sendControl(msg, gs.ctrl)
	a.metrics.intermediaries.WithLabelValues("key_exchange", "delivered").Inc()
	a.log.Info("SA keys delivered to a gateway", "gateway", gs.id.Name, "pair", fmt.Sprintf("%d-%d", d.grant.Enclave, d.grant.Peer),
		"spis", fmt.Sprintf("%08x,%08x", d.grant.SPIOut, d.grant.SPIIn))
}

// refuseGateway tells a gateway, over its session if it has one, that a
// request was refused.
func (a *Agent) refuseGateway(name string, code control.Refusal, reason string) {
	a.mu.RLock()
	gs := a.gwByName[name]
	a.mu.RUnlock()
	if gs == nil {
		return
	}
	if len(reason) > 255 {
		reason = reason[:255]
	}
	if msg, err := gs.session.Seal(&control.Inner{Type: control.InnerRefused, Refusal: code, Reason: reason}); err == nil {
		a.sendControl(msg, gs.ctrl)
	}
}

// expireDeliveries forgets keys whose gateway never opened a session.
func (a *Agent) expireDeliveries(now time.Time) {
	a.mu.Lock()
	defer a.mu.Unlock()
	for name, q := range a.deliveries {
		kept := q[:0]
		for _, d := range q {
			if now.Before(d.expires) {
				kept = append(kept, d)
				continue
			}
			clear(d.grant.KeyOut)
			clear(d.grant.KeyIn)
			d.finish()
			a.metrics.intermediaries.WithLabelValues("key_exchange", "expired").Inc()
		}
		if len(kept) == 0 {
			delete(a.deliveries, name)
		} else {
			a.deliveries[name] = kept
		}
	}
}

// onGatewaySealed handles a sealed message on an intermediary's session.
func (a *Agent) onGatewaySealed(gs *gwSession, s *control.Sealed) {
	in, err := gs.session.Open(s)
	if err != nil {
		a.metrics.drop("control_" + reasonOf(err))
		return
	}
	switch in.Type {
	case control.InnerKeyAck:
		k := ackKey{gs.id.Name, in.Ack}
		a.mu.Lock()
		done := a.acks[k]
		delete(a.acks, k)
		a.mu.Unlock()
		if done != nil {
			done()
		}
	case control.InnerRekeyRequest:
		a.spawn(func() { a.onRekeyRequest(gs, in.Request) })
	case control.InnerClose:
		a.mu.Lock()
		delete(a.gws, gs.session.Local)
		if a.gwByName[gs.id.Name] == gs {
			delete(a.gwByName, gs.id.Name)
		}
		a.mu.Unlock()
	default:
		a.metrics.drop("control_unexpected")
	}
}

// onRekeyRequest is the server's side of a late join: the proof must name
// a packet this server accepted on the SA moments ago, and the key
// service must allow the gateway the SA's pair; then the client is asked
// to re-establish the SA (its new handshake passes the gateway, which gets
// the keys by direct key exchange). Anything else changes nothing and is
// counted.
func (a *Agent) onRekeyRequest(gs *gwSession, req *control.RekeyRequest) {
	outcome := func(o string, args ...any) {
		a.metrics.intermediaries.WithLabelValues("rekey_request", o).Inc()
		a.log.Info("rekey request", append([]any{"gateway", gs.id.Name, "spi", fmt.Sprintf("%08x", req.SPI), "outcome", o}, args...)...)
	}
	a.mu.RLock()
	c := a.t.bySPI[keys.SPI(req.SPI)]
	a.mu.RUnlock()
	if c == nil || !c.server || c.closed.Load() {
		outcome("unknown_sa")
		a.refuseGateway(gs.id.Name, control.RefusedNoKey, "no SA of this server has that SPI")
		return
	}
	now := a.cfg.Now()
	c.mu.Lock()
	proven := c.proofs.holds(req.IV, req.ICV[:], now.Add(-control.ProofMaxAge).UnixMilli())
	recent := !c.lateJoin.IsZero() && now.Sub(c.lateJoin) < lateJoinEvery
	c.mu.Unlock()
	if !proven {
		outcome("unproven")
		a.refuseGateway(gs.id.Name, control.RefusedMalformed, "the proof names no packet this server accepted on the SA lately")
		return
	}
	if recent {
		outcome("too_soon")
		return
	}
	ctx, cancel := context.WithTimeout(a.ctx, authorizeTimeout)
	defer cancel()
	auth, err := a.cfg.KeyService.AuthorizeDirectKeyExchange(ctx, &api.AuthorizeDirectKeyExchangeRequest{
		Gateway: gs.id.Name, Enclave: uint32(c.vc.Enclave), Peer: uint32(c.vc.Peer)})
	if err != nil {
		outcome("error", "err", err)
		return
	}
	if !auth.GetAllowed() {
		outcome("unauthorised", "reason", auth.GetReason())
		a.refuseGateway(gs.id.Name, control.RefusedPolicy, auth.GetReason())
		return
	}
	c.mu.Lock()
	if !c.lateJoin.IsZero() && now.Sub(c.lateJoin) < lateJoinEvery {
		c.mu.Unlock()
		outcome("too_soon")
		return
	}
	c.lateJoin = now
	c.mu.Unlock()
	deadline := max(c.expires.Sub(now).Truncate(time.Second), 0)
	a.notify(c, &control.Inner{Type: control.InnerRekeyNotice, Rekey: &control.RekeyNotice{Reason: control.RekeyGateway, Deadline: deadline}})
	outcome("accepted", "peer", c.peer.Name)
}

// holdResponse sends a grant's Response once every delivery of its keys to
// the gateways that asked (waits) is over, or after responseHold: the
// client cannot send on the SA before it has the Response, so a gateway
// whose keys came first reads the SA from its first packet.
func (a *Agent) holdResponse(waits []chan struct{}, spi uint32, resp []byte, src netip.AddrPort, peer string) {
	timeout := time.NewTimer(responseHold)
	defer timeout.Stop()
	defer func() { // acks that never came are not waited for any more
		a.mu.Lock()
		for k := range a.acks {
			if k.spi == spi {
				delete(a.acks, k)
			}
		}
		a.mu.Unlock()
	}()
	for _, w := range waits {
		select {
		case <-w:
			continue
		case <-a.ctx.Done():
			return
		case <-timeout.C:
			a.metrics.intermediaries.WithLabelValues("key_exchange", "response_released").Inc()
			a.log.Warn("SA keys not delivered to a gateway in time: the Response goes, the gateway reads the SA when they come", "peer", peer, "waited", responseHold)
		}
		break
	}
	a.sendControl(resp, src)
}
