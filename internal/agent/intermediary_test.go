package agent

import (
	"context"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/enclavekeys/enclave/internal/api"
	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/control"
	"github.com/enclavekeys/enclave/internal/handshake"
)

// gatewaySession is a test's own intermediary: a gateway certificate and
// a control session with a server, made as a gateway makes one.
type gatewaySession struct {
	t       *testing.T
	conn    *net.UDPConn
	server  netip.AddrPort
	session *handshake.Session
}

func newGatewaySession(t *testing.T, o *org, server *Agent, name string) *gatewaySession {
	t.Helper()
	creds := o.Credentials(ca.Identity{Name: name, Role: ca.RoleGateway, Enclave: 7})
	conn, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	gs := &gatewaySession{t: t, conn: conn, server: controlEndpoint(server.DataPort())}
	init, msg, err := handshake.Initiate(creds, 0x0badcafe, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	resp := gs.roundTrip(msg)
	res, err := init.Complete(resp, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if !res.Payload.Session || res.Payload.Flags&control.FlagDirectKeyExchange == 0 || res.Peer.Identity.Name != server.Identity().Name {
		t.Fatalf("answer %+v from %s", res.Payload, res.Peer.Identity.Name)
	}
	gs.session = res.Session
	return gs
}

func (gs *gatewaySession) roundTrip(msg []byte) []byte {
	gs.t.Helper()
	if _, err := gs.conn.WriteToUDPAddrPort(msg, gs.server); err != nil {
		gs.t.Fatal(err)
	}
	buf := make([]byte, control.MaxMessage)
	gs.conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, _, err := gs.conn.ReadFromUDPAddrPort(buf)
	if err != nil {
		gs.t.Fatal(err)
	}
	return buf[:n]
}

// request sends a rekey request and returns the server's sealed answer,
// if one comes within wait.
func (gs *gatewaySession) request(r control.RekeyRequest, wait time.Duration) *control.Inner {
	gs.t.Helper()
	msg, err := gs.session.Seal(&control.Inner{Type: control.InnerRekeyRequest, Request: &r})
	if err != nil {
		gs.t.Fatal(err)
	}
	gs.conn.WriteToUDPAddrPort(msg, gs.server)
	buf := make([]byte, control.MaxMessage)
	gs.conn.SetReadDeadline(time.Now().Add(wait))
	n, _, err := gs.conn.ReadFromUDPAddrPort(buf)
	if err != nil {
		return nil
	}
	s, err := control.ParseSealed(buf[:n])
	if err != nil {
		gs.t.Fatal(err)
	}
	in, err := gs.session.Open(&s)
	if err != nil {
		gs.t.Fatal(err)
	}
	return &in
}

// serverSA is the server side of the agent's one SA.
func serverSA(t *testing.T, a *Agent) *conn {
	t.Helper()
	a.mu.RLock()
	defer a.mu.RUnlock()
	for _, c := range a.t.bySPI {
		if c.server {
			return c
		}
	}
	t.Fatal("no server SA")
	return nil
}

// TestRekeyRequests: the server's side of a late join. A request for an
// SPI it does not have, with a proof it never saw, with a proof too old,
// or from a gateway the key service does not allow the pair, changes
// nothing and is counted; a proven, authorised one has the client
// re-establish the SA (once: a second within lateJoinEvery is not acted
// on).
func TestRekeyRequests(t *testing.T) {
	o := pairOrg(t)
	o.Register(nil, []*api.AddDeviceRequest{{Name: "gw7", Role: "gateway", Enclave: 7}}, nil)
	server, client := echoPairIn(t, o)
	roundTrip(t, client, netip.AddrPortFrom(server.Addr(), 7), 1000)
	gs := newGatewaySession(t, o, server, "gw7")
	c := serverSA(t, server)
	proof := func() control.RekeyRequest {
		c.mu.Lock()
		defer c.mu.Unlock()
		p := c.proofs.recent[(c.proofs.nr-1)%control.ProofRecent]
		r := control.RekeyRequest{SPI: uint32(c.recvSPI), IV: p.iv}
		copy(r.ICV[:], p.icv[:])
		return r
	}
	outcome := func(o string) float64 {
		return metric(t, server, "enclave_agent_intermediary_total", map[string]string{"kind": "rekey_request", "outcome": o})
	}
	refused := func(in *control.Inner, what string) {
		t.Helper()
		if in == nil || in.Type != control.InnerRefused {
			t.Fatalf("%s: answer %+v", what, in)
		}
	}

	good := proof()
	unknown := good
	unknown.SPI ^= 0x1234
	refused(gs.request(unknown, 2*time.Second), "unknown SPI")
	forged := good
	forged.ICV[0] ^= 1
	refused(gs.request(forged, 2*time.Second), "forged ICV")
	wrongIV := good
	wrongIV.IV++
	refused(gs.request(wrongIV, 2*time.Second), "wrong IV")
	refused(gs.request(good, 2*time.Second), "no grant")
	if outcome("unknown_sa") != 1 || outcome("unproven") != 2 || outcome("unauthorised") != 1 || outcome("accepted") != 0 {
		t.Fatalf("outcomes: unknown %v, unproven %v, unauthorised %v", outcome("unknown_sa"), outcome("unproven"), outcome("unauthorised"))
	}

	if _, err := o.Admin.AddGrant(context.Background(), &api.AddGrantRequest{Device: "gw7", Pairs: []*api.Pair{{A: 3, B: 7}}}); err != nil {
		t.Fatal(err)
	}
	// Too old: the server remembers the packet, but not as recent.
	c.mu.Lock()
	saved := c.proofs
	for i := range c.proofs.recent {
		c.proofs.recent[i].at -= control.ProofMaxAge.Milliseconds() + 1000
	}
	c.mu.Unlock()
	refused(gs.request(good, 2*time.Second), "stale proof")
	c.mu.Lock()
	c.proofs = saved
	c.mu.Unlock()
	if outcome("unproven") != 3 {
		t.Fatalf("a stale proof was not refused as unproven")
	}
	oldSPI := c.recvSPI
	if in := gs.request(good, 500*time.Millisecond); in != nil {
		t.Fatalf("an accepted request was answered with %+v", in)
	}
	if outcome("accepted") != 1 {
		t.Fatalf("accepted: %v", outcome("accepted"))
	}
	waitFor(t, 5*time.Second, func() bool { return serverSA(t, server).recvSPI != oldSPI || server.SAs() > 1 })
	roundTrip(t, client, netip.AddrPortFrom(server.Addr(), 7), 1000)
	gs.request(good, 300*time.Millisecond)
	if outcome("accepted") != 1 || outcome("too_soon") != 1 {
		t.Fatalf("a second request re-established again: accepted %v, too soon %v", outcome("accepted"), outcome("too_soon"))
	}
}
