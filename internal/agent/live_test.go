package agent

import (
	"context"
	"net/netip"
	"testing"
	"time"

	"github.com/enclavekeys/enclave/internal/api"
)

// TestLivePairPolicy: a pair allowed after the server started reaches it
// on the watch stream (goal: 2 s; before, the server refused the pair
// until it restarted), and forbidding it ends its SAs on both sides.
func TestLivePairPolicy(t *testing.T) {
	o := pairOrg(t)
	server := o.agentFor(serverID("web1", 3, 258, "100.64.3.1/16"), nil, nil)
	echoServer(t, server, 7)
	lab := o.agentFor(clientID("lab", 9, "100.64.9.1/16"), []Route{route(server)}, nil)
	to := netip.AddrPortFrom(server.Addr(), 7)
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	if c, err := lab.Net().DialContextTCPAddrPort(ctx, to); err == nil {
		c.Close()
		t.Fatal("a client of a forbidden pair connected")
	}
	cancel()
	begin := time.Now()
	if _, err := o.Admin.AllowPair(context.Background(), &api.AllowPairRequest{A: 3, B: 9}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, func() bool { return server.holdsCurrent(9, 1) })
	t.Logf("the server holds SK(3,9) %v after the pair was allowed", time.Since(begin).Round(time.Millisecond))
	roundTrip(t, lab, to, 1000)

	begin = time.Now()
	if _, err := o.Admin.ForbidPair(context.Background(), &api.ForbidPairRequest{A: 3, B: 9}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, func() bool { return lab.SAs() == 0 && !server.holdsCurrent(9, 1) })
	t.Logf("the pair's SAs ended %v after it was forbidden", time.Since(begin).Round(time.Millisecond))
	for _, a := range server.Associations() {
		if a.VC.Peer == 9 {
			t.Fatalf("the server still holds an SA of the forbidden pair: %+v", a)
		}
	}
	if n := metric(t, server, "enclave_agent_sas_ended_total", map[string]string{"reason": "key_withdrawn"}); n < 1 {
		t.Errorf("%v SAs counted as ended by the withdrawn key", n)
	}
	// The 3-7 client is untouched.
	laptop := o.agentFor(clientID("laptop", 7, "100.64.7.1/16"), []Route{route(server)}, nil)
	roundTrip(t, laptop, to, 1000)
}

// TestClientLearnsRevocations: a client given the key service follows its
// revocations: when its server is revoked, the client ends its SA with it
// and refuses it at the next handshake, within seconds (before, clients
// accepted a revoked server until its certificate expired).
func TestClientLearnsRevocations(t *testing.T) {
	o := pairOrg(t)
	server := o.agentFor(serverID("web1", 3, 258, "100.64.3.1/16"), nil, nil)
	echoServer(t, server, 7)
	cid := clientID("laptop", 7, "100.64.7.1/16")
	client := o.agentFor(cid, []Route{route(server)}, func(c *Config) { c.KeyService = o.KeyService(cid) })
	to := netip.AddrPortFrom(server.Addr(), 7)
	roundTrip(t, client, to, 1000)
	begin := time.Now()
	if _, err := o.Admin.RevokeDevice(context.Background(), &api.RevokeDeviceRequest{Name: "web1"}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, func() bool { return client.isRevoked("web1") && client.SAs() == 0 })
	t.Logf("the client ended its SA with the revoked server %v after the revocation", time.Since(begin).Round(time.Millisecond))
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	if c, err := client.Net().DialContextTCPAddrPort(ctx, to); err == nil {
		c.Close()
		t.Fatal("the client reached a revoked server")
	}
	if n := metric(t, client, "enclave_agent_handshakes_total", map[string]string{"side": "initiator", "reason": "revoked"}); n < 1 {
		t.Fatalf("%v handshakes refused as revoked", n)
	}
}

// TestServesAfterRevocationSnapshot: an agent is ready only once it knows
// every revocation the key service holds (before, it answered handshakes
// before the watch's snapshot had arrived).
func TestServesAfterRevocationSnapshot(t *testing.T) {
	o := pairOrg(t)
	if _, err := o.Admin.RevokeDevice(context.Background(), &api.RevokeDeviceRequest{Name: "lab"}); err != nil {
		t.Fatal(err)
	}
	for range 5 {
		server, stop := o.startAgent(serverID("web1", 3, 258, "100.64.3.1/16"), nil, nil, netip.AddrPort{})
		if !server.isRevoked("lab") {
			t.Fatal("ready before the revocations were known")
		}
		stop()
	}
}
