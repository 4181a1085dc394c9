package gateway

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/control"
	"github.com/enclavekeys/enclave/internal/handshake"
	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/packet"
)

// The gateway's own control sessions with servers (DESIGN §5.5, §5.6).
// A session is a handshake the gateway initiates with its gateway
// certificate; the server answers with a session and no SA. Over it the
// server delivers the keys of SAs the gateway asked for (need-key), and
// the gateway sends rekey requests for SAs it met too late.

const (
	sessionTimeout = time.Second
	sessionTries   = 5
	// sessionFresh: a need-key handshake re-establishes a session older
	// than this (the server may have restarted and forgotten it).
	sessionFresh = 30 * time.Second
	// notServerFor: an endpoint that never answered is not asked again
	// for this long (it is a client, or no agent at all).
	notServerFor = time.Minute
	maxSessions  = 4096
	// maxInFlight bounds the handshakes the gateway has on their way at
	// once (each is retransmitted every second until it gives up): past
	// it, the oldest one in flight gives way.
	maxInFlight = 256
	// unprovenRate and unprovenBurst bound the sessions the whole gateway
	// opens a second towards endpoints that never answered it as a
	// server: junk need-key initiations towards arbitrary addresses then
	// cost those addresses a bounded trickle of the gateway's own
	// initiations, whoever sends them. An endpoint it holds a session
	// with is not charged. (Waiting for an endpoint to answer first is no
	// option: a server holds its Response until the gateway has the SA's
	// keys, which come over this session.)
	unprovenRate  = 20
	unprovenBurst = 50
	// unprovenPerSource bounds, a second, the sessions towards endpoints
	// never heard answer that one source's initiations may have the
	// gateway open (bursts of unprovenSourceBurst): one client cannot
	// spend the whole gateway's budget and hold everyone's new SAs.
	unprovenPerSource, unprovenSourceBurst = 2, 5
)

// serverSession is the gateway's session with one server control
// endpoint, or the handshake making it.
type serverSession struct {
	ep       netip.AddrPort
	init     *handshake.Initiator
	msg      []byte
	sent     time.Time
	tries    int
	session  *handshake.Session
	server   ca.Identity
	at       time.Time
	failed   time.Time // when the endpoint last failed to answer
	requests []control.RekeyRequest
}

// servers are the gateway's sessions, by endpoint and by session index.
type servers struct {
	mu      sync.Mutex
	byEP    map[netip.AddrPort]*serverSession
	byIndex map[uint32]*serverSession
	// unproven is the budget of sessions towards endpoints never heard
	// answer (rate and burst are fields so that a test can lift them).
	unproven                    bucket
	unprovenRate, unprovenBurst float64
	// bySource is each source's share of it.
	bySource budget
}

func (s *servers) init() {
	s.byEP = map[netip.AddrPort]*serverSession{}
	s.byIndex = map[uint32]*serverSession{}
	s.unprovenRate, s.unprovenBurst = unprovenRate, unprovenBurst
	s.unproven = bucket{tokens: unprovenBurst}
	s.bySource.rate, s.bySource.burst = unprovenPerSource, unprovenSourceBurst
}

// ensure makes sure the gateway has (or is making) a session with the
// server at control endpoint ep; with fresh, one older than sessionFresh
// is made again.
// from is the source whose initiation asks for it (zero: the gateway's
// own need, a late join).
func (s *servers) ensure(g *Gateway, ep netip.AddrPort, fresh bool, from netip.Addr) {
	now := g.cfg.Now()
	s.mu.Lock()
	defer s.mu.Unlock()
	ss := s.byEP[ep]
	switch {
	case ss == nil:
	case ss.init != nil: // a handshake is on its way
		return
	case !ss.failed.IsZero() && now.Sub(ss.failed) < notServerFor:
		return
	case ss.session != nil && (!fresh || now.Sub(ss.at) < sessionFresh):
		return
	}
	if !g.amp.has(ep.Addr(), g.sessionInitLen()) {
		// It would send more towards an address that never answered than
		// it got for it (amplify.go): a later handshake brings credit.
		g.metrics.session("amplification_limited")
		return
	}
	if ss == nil || ss.at.IsZero() {
		if from.IsValid() && !s.bySource.allow(from, now) {
			g.metrics.session("unproven_source_limited")
			return
		}
		if !s.unproven.take(now, s.unprovenRate, s.unprovenBurst) {
			g.metrics.session("unproven_limited")
			return
		}
	}
	if ss == nil {
		if s.inFlightLocked() >= maxInFlight {
			// The oldest handshake in flight goes: a real server answers
			// within moments, so junk towards silent endpoints is what
			// ages out.
			s.evictInFlightLocked()
			g.metrics.session("evicted_in_flight")
		}
		if len(s.byEP) >= maxSessions {
			s.evictLocked()
		}
		ss = &serverSession{ep: ep}
		s.byEP[ep] = ss
	}
	ss.tries = 0
	s.startLocked(g, ss, now)
}

// evictLocked drops the least recently made session (one with no
// handshake in flight, if there is one), so that the table stays within
// maxSessions whatever is in it.
func (s *servers) evictLocked() {
	// a is a better victim than b: idle before in flight, then older.
	better := func(a, b *serverSession) bool {
		if (a.init == nil) != (b.init == nil) {
			return a.init == nil
		}
		return a.lastUse().Before(b.lastUse())
	}
	var oldest *serverSession
	for _, ss := range s.byEP {
		if oldest == nil || better(ss, oldest) {
			oldest = ss
		}
	}
	if oldest != nil {
		delete(s.byEP, oldest.ep)
		if oldest.session != nil {
			delete(s.byIndex, oldest.session.Local)
		}
		if oldest.init != nil {
			delete(s.byIndex, oldest.init.Sender())
		}
	}
}

// evictInFlightLocked drops the handshake in flight sent longest ago.
func (s *servers) evictInFlightLocked() {
	var oldest *serverSession
	for _, ss := range s.byEP {
		if ss.init != nil && (oldest == nil || ss.sent.Before(oldest.sent)) {
			oldest = ss
		}
	}
	if oldest != nil {
		delete(s.byEP, oldest.ep)
		delete(s.byIndex, oldest.init.Sender())
		if oldest.session != nil {
			delete(s.byIndex, oldest.session.Local)
		}
	}
}

// lastUse is when the session was made or its handshake last sent.
func (ss *serverSession) lastUse() time.Time {
	if ss.sent.After(ss.at) {
		return ss.sent
	}
	return ss.at
}

// inFlightLocked counts the handshakes on their way.
func (s *servers) inFlightLocked() int {
	n := 0
	for _, ss := range s.byEP {
		if ss.init != nil {
			n++
		}
	}
	return n
}

// startLocked sends a fresh initiation to ss's endpoint (under s.mu).
func (s *servers) startLocked(g *Gateway, ss *serverSession, now time.Time) {
	if ss.init != nil {
		delete(s.byIndex, ss.init.Sender())
	}
	idx := s.newIndexLocked()
	init, msg, err := handshake.Initiate(g.creds.Load(), idx, now)
	if err != nil {
		g.metrics.session("failed")
		return
	}
	g.initLen.Store(int64(len(msg)))
	if !g.amp.spend(ss.ep.Addr(), len(msg)) {
		g.metrics.session("amplification_limited") // sent when credit comes, or given up
		ss.init, ss.msg, ss.sent = init, nil, now
		s.byIndex[idx] = ss
		return
	}
	ss.init, ss.msg, ss.sent = init, msg, now
	ss.tries++
	s.byIndex[idx] = ss
	if _, err := g.own.WriteToUDPAddrPort(msg, ss.ep); err != nil {
		g.metrics.session("send_failed")
	}
}

func (s *servers) newIndexLocked() uint32 {
	for {
		var b [4]byte
		rand.Read(b[:])
		if i := binary.BigEndian.Uint32(b[:]); i != 0 && s.byIndex[i] == nil {
			return i
		}
	}
}

// retransmit resends initiations that got no answer, and gives up on an
// endpoint after sessionTries.
func (s *servers) retransmit(g *Gateway, now time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, ss := range s.byEP {
		if ss.init == nil || now.Sub(ss.sent) < sessionTimeout {
			continue
		}
		// An endpoint that never answered gets two tries, not five (a
		// junk initiation towards an address that is no server costs
		// little), and none after 5 s without one it could send (no
		// credit, amplify.go).
		if ss.tries >= sessionTries || (ss.tries >= 2 && ss.session == nil && ss.at.IsZero()) || now.Sub(ss.sent) > 5*sessionTimeout {
			delete(s.byIndex, ss.init.Sender())
			ss.init, ss.msg, ss.failed, ss.requests = nil, nil, now, nil
			g.metrics.session("timeout")
			continue
		}
		if !g.amp.has(ss.ep.Addr(), g.sessionInitLen()) {
			continue // no credit yet: the try is not spent
		}
		s.startLocked(g, ss, now)
	}
}

// sessionInitLen is the length of the gateway's own initiation (the last
// one made; its certificate's length fixes it), or an estimate before the
// first.
func (g *Gateway) sessionInitLen() int {
	if n := g.initLen.Load(); n > 0 {
		return int(n)
	}
	return 200 + len(g.creds.Load().CertDER)
}

// readOwn serves the gateway's own control socket: the servers' answers
// and the sealed messages of its sessions.
func (g *Gateway) readOwn() {
	buf := make([]byte, control.MaxMessage+1)
	for {
		n, _, err := g.own.ReadFromUDPAddrPort(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue
		}
		msg := buf[:n]
		h, err := control.ParseHeader(msg)
		if err != nil {
			g.metrics.session("malformed")
			continue
		}
		switch h.Type {
		case control.TypeResponse:
			g.onSessionResponse(msg)
		case control.TypeSealed:
			g.onSessionSealed(msg)
		case control.TypeCookieReply:
			g.onSessionCookie(msg)
		default:
			g.metrics.session("unexpected")
		}
	}
}

func (g *Gateway) onSessionCookie(msg []byte) {
	echo, cookie, err := control.ParseCookieReply(msg)
	if err != nil {
		return
	}
	s := &g.servers
	s.mu.Lock()
	defer s.mu.Unlock()
	ss := s.byIndex[echo]
	if ss == nil || ss.init == nil {
		return
	}
	ss.msg = ss.init.WithCookie(cookie)
	g.own.WriteToUDPAddrPort(ss.msg, ss.ep)
}

// onSessionResponse completes a session: the responder must be a server
// of the org, answering with a session.
func (g *Gateway) onSessionResponse(msg []byte) {
	resp, err := control.ParseResponse(msg)
	if err != nil {
		g.metrics.session("malformed")
		return
	}
	s := &g.servers
	s.mu.Lock()
	ss := s.byIndex[resp.Receiver]
	if ss == nil || ss.init == nil || ss.init.Sender() != resp.Receiver {
		s.mu.Unlock()
		g.metrics.session("unknown")
		return
	}
	now := g.cfg.Now()
	res, err := ss.init.Complete(msg, now)
	if err != nil {
		// Not the server's (forged, garbled): dropped and counted; the
		// session stays in flight for the real Response.
		s.mu.Unlock()
		g.metrics.session("unauthenticated")
		return
	}
	switch {
	case res.Peer.Identity.Role != ca.RoleServer:
		err = fmt.Errorf("the responder is a %s, not a server", res.Peer.Identity.Role)
	case !res.Payload.Session:
		err = fmt.Errorf("refused: %s (%s)", res.Payload.Refusal, res.Payload.Reason)
	}
	if err != nil {
		delete(s.byIndex, resp.Receiver)
		ss.init, ss.msg, ss.failed, ss.requests = nil, nil, now, nil
		s.mu.Unlock()
		g.metrics.session("refused")
		g.log.Warn("session with a server failed", "server", ss.ep, "err", err)
		return
	}
	if ss.session != nil {
		delete(s.byIndex, ss.session.Local)
	}
	ss.init, ss.msg, ss.failed = nil, nil, time.Time{}
	g.amp.prove(ss.ep.Addr())
	ss.session, ss.server, ss.at = res.Session, res.Peer.Identity, now
	s.byIndex[res.Session.Local] = ss
	requests := ss.requests
	ss.requests = nil
	s.mu.Unlock()
	g.metrics.session("ok")
	g.log.Info("session with a server", "server", res.Peer.Identity.Name, "at", ss.ep)
	for i := range requests {
		g.late.refresh(&requests[i], now)
		g.sendRequest(res.Session, ss.ep, res.Peer.Identity.Name, &requests[i])
	}
}

// onSessionSealed handles a server's message on a session: keys delivered
// (installed, if they are the server's own SAs), or a refusal (logged and
// counted).
func (g *Gateway) onSessionSealed(msg []byte) {
	sm, err := control.ParseSealed(msg)
	if err != nil {
		g.metrics.session("malformed")
		return
	}
	s := &g.servers
	s.mu.Lock()
	ss := s.byIndex[sm.Receiver]
	var sess *handshake.Session
	var server ca.Identity
	var ep netip.AddrPort
	if ss != nil && ss.session != nil && ss.session.Local == sm.Receiver {
		sess, server, ep = ss.session, ss.server, ss.ep
	}
	s.mu.Unlock()
	if sess == nil {
		g.metrics.session("unknown")
		return
	}
	in, err := sess.Open(&sm)
	if err != nil {
		g.metrics.session("unauthenticated")
		return
	}
	switch in.Type {
	case control.InnerKeyDelivery:
		spi := in.Keys.SPIOut
		if g.install(server, in.Keys) {
			// Installed: the server may now let the SA's client send.
			if ack, err := sess.Seal(&control.Inner{Type: control.InnerKeyAck, Ack: spi}); err == nil {
				g.own.WriteToUDPAddrPort(ack, ep)
			}
		}
	case control.InnerRefused:
		g.metrics.keyExchange("refused")
		g.log.Warn("a server refused this gateway", "server", server.Name, "code", in.Refusal.String(), "reason", in.Reason)
	default:
		g.metrics.session("unexpected")
	}
}

// saKey names one direction of an SA: its VC and SPI.
type saKey struct {
	vc  keys.VC
	spi keys.SPI
}

// deliveredSA is an SA direction's key, from direct key exchange.
type deliveredSA struct {
	aead    packet.AEAD
	expires time.Time
}

// delivered are the SA keys direct key exchange gave the gateway.
type delivered struct {
	mu sync.RWMutex
	m  map[saKey]*deliveredSA
}

func (d *delivered) get(k saKey) *packet.AEAD {
	d.mu.RLock()
	defer d.mu.RUnlock()
	if s := d.m[k]; s != nil {
		return &s.aead
	}
	return nil
}

func (d *delivered) len() int {
	d.mu.RLock()
	defer d.mu.RUnlock()
	return len(d.m)
}

func (d *delivered) expire(now time.Time) {
	d.mu.Lock()
	defer d.mu.Unlock()
	for k, s := range d.m {
		if !now.Before(s.expires) {
			s.aead.Reset()
			delete(d.m, k)
		}
	}
}

func (d *delivered) clear() {
	d.mu.Lock()
	defer d.mu.Unlock()
	for k, s := range d.m {
		s.aead.Reset()
		delete(d.m, k)
	}
}

// DeliveredSA names an SA direction whose key the gateway holds from
// direct key exchange (for reports and maps; no key material).
type DeliveredSA struct {
	VC      keys.VC
	SPI     keys.SPI
	Expires time.Time
}

// Delivered lists the SA directions whose keys direct key exchange gave
// the gateway.
func (g *Gateway) Delivered() []DeliveredSA {
	g.dkx.mu.RLock()
	defer g.dkx.mu.RUnlock()
	out := make([]DeliveredSA, 0, len(g.dkx.m))
	for k, s := range g.dkx.m {
		out = append(out, DeliveredSA{VC: k.vc, SPI: k.spi, Expires: s.expires})
	}
	return out
}

// install keeps both directions' keys of a delivered SA until its
// validity ends. A server delivers only its own SAs: a grant naming
// another server or enclave is refused.
func (g *Gateway) install(server ca.Identity, gr *control.Grant) bool {
	defer func() {
		clear(gr.KeyOut)
		clear(gr.KeyIn)
	}()
	if keys.EnclaveID(gr.Enclave) != server.Enclave || !server.HasServerID || keys.ServerID(gr.Server) != server.ServerID {
		g.metrics.keyExchange("foreign")
		g.log.Warn("a server delivered keys of an SA not its own", "server", server.Name, "vc", fmt.Sprintf("%d,%d,%d", gr.Enclave, gr.Peer, gr.Server))
		return false
	}
	vc := keys.VC{Enclave: keys.EnclaveID(gr.Enclave), Peer: keys.EnclaveID(gr.Peer), Server: keys.ServerID(gr.Server)}
	expires := g.cfg.Now().Add(gr.Lifetime)
	var sas [2]*deliveredSA
	for i, k := range [][]byte{gr.KeyOut, gr.KeyIn} {
		sas[i] = &deliveredSA{expires: expires}
		if err := sas[i].aead.Init(keys.Version(gr.PSPVersion), k); err != nil {
			g.metrics.keyExchange("malformed")
			return false
		}
	}
	g.dkx.mu.Lock()
	if len(g.dkx.m)+2 > maxDelivered {
		g.dkx.mu.Unlock()
		g.metrics.keyExchange("full")
		return false
	}
	g.dkx.m[saKey{vc, keys.SPI(gr.SPIOut)}] = sas[0]
	g.dkx.m[saKey{vc, keys.SPI(gr.SPIIn)}] = sas[1]
	g.dkx.mu.Unlock()
	g.late.forget(saKey{vc, keys.SPI(gr.SPIOut)}, saKey{vc, keys.SPI(gr.SPIIn)})
	g.metrics.keyExchange("delivered")
	g.log.Info("SA keys by direct key exchange", "server", server.Name, "pair", fmt.Sprintf("%d-%d", gr.Enclave, gr.Peer),
		"spis", fmt.Sprintf("%08x,%08x", gr.SPIOut, gr.SPIIn), "valid", gr.Lifetime)
	return true
}

// sendRequest sends a rekey request on an established session with the
// server at ep.
func (g *Gateway) sendRequest(sess *handshake.Session, ep netip.AddrPort, server string, r *control.RekeyRequest) {
	msg, err := sess.Seal(&control.Inner{Type: control.InnerRekeyRequest, Request: r})
	if err != nil {
		return
	}
	if _, err := g.own.WriteToUDPAddrPort(msg, ep); err != nil {
		g.metrics.lateJoin("send_failed")
		return
	}
	g.metrics.lateJoin("sent")
	g.log.Info("rekey request sent (late join)", "server", server, "spi", fmt.Sprintf("%08x", r.SPI))
}
