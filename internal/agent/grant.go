package agent

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"sync"
	"time"

	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/control"
	"github.com/enclavekeys/enclave/internal/discovery"
	"github.com/enclavekeys/enclave/internal/handshake"
	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/sa"
)

// onInitiation is the server's side of a handshake: flood guard, the
// initiator's authentication, the refusals policy and discovery decide on,
// and the SA grant.
func (a *Agent) onInitiation(src netip.AddrPort, msg []byte) {
	if !a.server {
		a.metrics.drop("not_a_server")
		return
	}
	in, err := control.ParseInitiation(msg)
	if err != nil {
		a.metrics.handshake("responder", "dropped", "malformed")
		return
	}
	now := a.cfg.Now()
	switch a.guard.Admit(src, &in, now) {
	case handshake.Drop:
		a.metrics.handshake("responder", "dropped", "rate")
		return
	case handshake.SendCookie:
		reply, err := control.AppendCookieReply(nil, in.Sender, a.guard.Cookies.Make(src, now))
		if err == nil {
			a.sendControl(reply, src)
		}
		a.metrics.handshake("responder", "cookie", "load")
		return
	}
	r, err := handshake.Respond(a.creds.Load(), &in, now)
	if err != nil {
		a.metrics.handshake("responder", "failed", reasonOf(err))
		a.log.Warn("handshake refused", "from", src, "err", err)
		return
	}
	if r.Peer.Identity.Role == ca.RoleGateway {
		a.onGatewayInitiation(r, src, now)
		return
	}
	grant, refusal, reason, gateways := a.decide(r, now)
	a.mu.Lock()
	idx := a.newIndex()
	a.mu.Unlock()
	payload := control.ResponderPayload{Flags: control.FlagDirectKeyExchange, Grant: grant, Refusal: refusal, Reason: reason}
	resp, session, err := r.Finish(idx, payload)
	if err != nil {
		a.metrics.handshake("responder", "failed", "finish")
		return
	}
	if grant == nil {
		a.metrics.handshake("responder", "refused", refusal.String())
		a.log.Warn("SA refused", "peer", r.Peer.Identity.String(), "code", refusal.String(), "reason", reason)
		a.sendControl(resp, src)
		return
	}
	// Intermediaries on the path that asked for this SA's keys (§5.5):
	// each gets its own copy, handed over once the key service agrees,
	// and the Response waits for them (holdResponse).
	var waits []chan struct{}
	for _, gw := range gateways {
		if gw.NeedsKey(keys.EnclaveID(grant.Enclave), keys.EnclaveID(grant.Peer)) {
			g := *grant
			g.KeyOut, g.KeyIn = append([]byte(nil), grant.KeyOut...), append([]byte(nil), grant.KeyIn...)
			w := make(chan struct{})
			waits = append(waits, w)
			var once sync.Once
			a.spawn(func() { a.exchangeKeys(gw, g, func() { once.Do(func() { close(w) }) }) })
		}
	}
	c, err := a.serverConn(r, grant, session, src, now)
	if err != nil {
		a.metrics.handshake("responder", "failed", "grant")
		return
	}
	a.mu.Lock()
	superseded := a.t.add(c, a.cfg.Now())
	n := len(a.t.bySPI)
	a.mu.Unlock()
	a.metrics.sas.Set(float64(n))
	a.metrics.ended.WithLabelValues("superseded").Add(float64(superseded))
	a.metrics.handshake("responder", "ok", "")
	a.log.Info("SA granted", "peer", r.Peer.Identity.String(), "enclave", grant.Peer, "generation", grant.Generation)
	if len(waits) > 0 {
		peer := r.Peer.Identity.String()
		spi := grant.SPIOut
		a.spawn(func() { a.holdResponse(waits, spi, resp, src, peer) })
		return
	}
	a.sendControl(resp, src)
}

// admit applies the refusals every initiator meets: revoked, replayed.
func (a *Agent) admit(r *handshake.Responding) (control.Refusal, string) {
	id := r.Peer.Identity
	key := id.String()
	a.mu.Lock()
	revoked := a.revoked[id.Name]
	last, seen := a.last[key]
	if !revoked && (!seen || r.Timestamp.After(last)) {
		a.last[key] = r.Timestamp
	}
	a.mu.Unlock()
	switch {
	case revoked:
		return control.RefusedRevoked, id.Name + " is revoked"
	case seen && !r.Timestamp.After(last):
		return control.RefusedReplay, "the initiation is not newer than the last one"
	}
	return 0, ""
}

// decide applies the refusals (revoked, replayed, role, overlay,
// discovery, policy) and grants the SA when none applies. It also returns
// the verified intermediaries on the handshake's path.
func (a *Agent) decide(r *handshake.Responding, now time.Time) (*control.Grant, control.Refusal, string, []discovery.Intermediary) {
	id := r.Peer.Identity
	key := id.String()
	if refusal, reason := a.admit(r); refusal != 0 {
		return nil, refusal, reason, nil
	}
	switch {
	case id.Role == ca.RoleAdmin || id.Role == ca.RoleKeyserver:
		return nil, control.RefusedRole, fmt.Sprintf("a %s does not form SAs", id.Role), nil
	case !id.Overlay.IsValid():
		return nil, control.RefusedCert, "the certificate carries no overlay address", nil
	}
	dec, err := a.disc.Decide(id, r.Initiation.Noise, &r.Initiation.Path, now)
	for _, d := range dec.Disagreements {
		a.metrics.discovery.WithLabelValues(string(d.Kind)).Inc()
		level := slog.LevelDebug // counted; the normal path has some (a client-side gateway)
		if d.Kind.Alarming() {
			level = slog.LevelWarn
		}
		a.log.Log(context.Background(), level, "discovery disagreement", "peer", key, "kind", string(d.Kind), "entry", d.Entry, "detail", d.Detail)
	}
	if err != nil {
		return nil, control.RefusedEnclave, err.Error(), nil
	}
	j := dec.Enclave
	a.mu.Lock()
	defer a.mu.Unlock()
	sk := a.currentKey(j)
	if sk == nil {
		return nil, control.RefusedPolicy, fmt.Sprintf("pair %d-%d is not allowed: this server holds no key for it", a.id.Enclave, j), nil
	}
	vc := keys.VC{Enclave: a.id.Enclave, Peer: j, Server: a.id.ServerID}
	g := &control.Grant{PSPVersion: uint8(keys.PSPv1), Enclave: uint16(vc.Enclave), Peer: uint16(j), Server: uint32(vc.Server),
		Generation: uint32(sk.gen), Lifetime: a.cfg.Lifetime}
	if until := sk.until.Sub(now); until < g.Lifetime {
		g.Lifetime = max(until, 0).Truncate(time.Second) // never past the key's own validity
	}
	// Nor past either side's certificate: an SA must not outlive the
	// identity that made it (the client ends it then, and says why).
	if until := earliest(r.Peer.Expires, a.creds.Load().Expires()).Sub(now); until < g.Lifetime {
		if g.Lifetime = max(until, 0).Truncate(time.Second); g.Lifetime < time.Second {
			return nil, control.RefusedCert, fmt.Sprintf("a certificate of this SA ends at %s: renew it", earliest(r.Peer.Expires, a.creds.Load().Expires()).UTC().Format(time.RFC3339)), nil
		}
	}
	spis := [2]keys.SPI{}
	for i := range spis {
		idx, err := sk.spis.index()
		if err == nil {
			spis[i], err = keys.NewSPI(sk.gen, idx)
		}
		if err != nil {
			a.metrics.drop("no_spi_lease")
			a.log.Warn("no SPI to grant", "peer", j, "generation", sk.gen, "err", err)
			a.askLease(j, sk)
			return nil, control.RefusedNoKey, "this server has no SPI leased from the key service for the pair yet; try again", nil
		}
	}
	a.askLease(j, sk)
	g.SPIOut, g.SPIIn = uint32(spis[0]), uint32(spis[1])
	var ck keys.SAKey
	for i, spi := range spis {
		if err := sk.deriver.SAKey(&ck, vc, spi, keys.PSPv1); err != nil {
			return nil, control.RefusedNoKey, "derivation failed", nil
		}
		if i == 0 {
			g.KeyOut = append([]byte(nil), ck.Bytes()...)
		} else {
			g.KeyIn = append([]byte(nil), ck.Bytes()...)
		}
	}
	ck.Zero()
	return g, 0, "", dec.Intermediaries
}

// serverConn makes the server side of a granted SA.
func (a *Agent) serverConn(r *handshake.Responding, g *control.Grant, s *handshake.Session, src netip.AddrPort, now time.Time) (*conn, error) {
	vc := keys.VC{Enclave: keys.EnclaveID(g.Enclave), Peer: keys.EnclaveID(g.Peer), Server: keys.ServerID(g.Server)}
	out, err := sa.NewOutbound(sa.Config{SPI: keys.SPI(g.SPIIn), VC: vc, Version: keys.PSPv1, Key: g.KeyIn})
	if err != nil {
		return nil, err
	}
	id := r.Peer.Identity
	c := &conn{peer: id, overlay: id.Overlay.Addr(), server: true, vc: vc, gen: keys.Generation(g.Generation),
		recvSPI: keys.SPI(g.SPIOut), sendSPI: keys.SPI(g.SPIIn), out: out, session: s, created: now, expires: now.Add(g.Lifetime)}
	a.capAtCerts(c, r.Peer.Expires)
	c.setControl(src)
	c.setEndpoint(netip.AddrPortFrom(src.Addr(), src.Port()-1)) // the data port is the one below the control port
	c.lastSeen.Store(now.UnixMilli())
	clear(g.KeyOut)
	clear(g.KeyIn)
	return c, nil
}

// askLease asks the key service for the next SPI lease of sk, in the
// background, when its allocator wants one (called under a.mu).
func (a *Agent) askLease(j keys.EnclaveID, sk *serverKey) {
	if n, ok := sk.spis.wantLease(); ok {
		id, s := skID{j, sk.gen}, sk.spis
		a.spawn(func() {
			if err := a.leaseOne(a.ctx, id, s, n); err != nil {
				a.log.Warn("SPI lease", "err", err)
			}
		})
	}
}
