package gateway

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/enclavekeys/enclave/internal/api"
	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/control"
	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/orgtest"
	"github.com/enclavekeys/enclave/internal/registry"
)

// TestStartsBeforeKeyService: a gateway started while the key service is
// down waits for it instead of failing, and reads its granted pair as soon
// as the service answers.
func TestStartsBeforeKeyService(t *testing.T) {
	l := newLab(t)
	l.grant("gw1", [2]uint32{1, 2})
	l.o.Down()
	start := time.Now()
	go func() {
		time.Sleep(1500 * time.Millisecond)
		l.o.Up()
	}()
	gw := l.gateway("gw1", 1, gwOpts{})
	if waited := time.Since(start); waited < time.Second {
		t.Fatalf("ready after %v, before the key service was up", waited)
	}
	cli := l.client("cli", 1, "100.64.1.1/16", gw.RelayAddr())
	mustExchange(t, cli, "100.64.2.1:7", 2000)
	if n := counter(t, gw.Metrics().Registry(), "enclave_gateway_pair_packets_total", map[string]string{"pair": "1-2", "outcome": "read"}); n == 0 {
		t.Fatal("the gateway read nothing of its granted pair")
	}
}

// TestLiveGrant: a grant added while the gateway runs reaches it on the
// watch stream (goal: 2 s; before, up to the minute's refetch), and a
// withdrawn one stops its reading as fast.
func TestLiveGrant(t *testing.T) {
	l := newLab(t)
	gw := l.gateway("gw1", 1, gwOpts{})
	cli := l.client("cli", 1, "100.64.1.1/16", gw.RelayAddr())
	mustExchange(t, cli, "100.64.2.1:7", 2000)
	reg := gw.Metrics().Registry()
	read := func() float64 {
		return counter(t, reg, "enclave_gateway_pair_packets_total", map[string]string{"pair": "1-2", "outcome": "read"})
	}
	if read() != 0 {
		t.Fatal("read a pair it holds no grant for")
	}
	begin := time.Now()
	l.grant("gw1", [2]uint32{1, 2})
	waitFor(t, 10*time.Second, "the grant to reach the gateway", func() bool { return gw.keys.isGranted(registry.NewPair(1, 2)) })
	t.Logf("granted pair read from %v after the grant", time.Since(begin).Round(time.Millisecond))
	mustExchange(t, cli, "100.64.2.1:7", 2000)
	if read() == 0 {
		t.Fatal("the granted pair is not read")
	}
	begin = time.Now()
	if _, err := l.o.Admin.RevokeGrant(context.Background(), &api.RevokeGrantRequest{Device: "gw1", Pairs: []*api.Pair{{A: 1, B: 2}}}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "the withdrawal to reach the gateway", func() bool { return !gw.keys.isGranted(registry.NewPair(1, 2)) })
	t.Logf("withdrawn %v after the revocation of the grant", time.Since(begin).Round(time.Millisecond))
	before := read()
	mustExchange(t, cli, "100.64.2.1:7", 2000)
	if read() != before {
		t.Fatal("still reading a pair whose grant was withdrawn")
	}
}

// TestPolicyReload: a policy put in force while the gateway runs judges new
// flows at once and flows already running at their next packet (a TCP
// connection a new deny rule names is cut mid-way); the flow log keeps
// every flow with its last verdict.
func TestPolicyReload(t *testing.T) {
	l := newLab(t)
	l.grant("gw1", [2]uint32{1, 2})
	gw := l.gateway("gw1", 1, gwOpts{flowLog: true, policy: "deny:\n  - {proto: tcp, dst_port: 5999}\n"})
	cli := l.client("cli", 1, "100.64.1.1/16", gw.RelayAddr())
	if err := exchange(cli, netip.MustParseAddrPort("100.64.2.1:5999"), 100, time.Second); err == nil {
		t.Fatal("a denied flow got through")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := cli.Net().DialContextTCPAddrPort(ctx, netip.MustParseAddrPort("100.64.2.1:7"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := orgtest.RoundTrip(c, 1000, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	p, err := ParsePolicy([]byte("deny:\n  - {proto: tcp, dst_port: 7}\n"))
	if err != nil {
		t.Fatal(err)
	}
	gw.SetPolicy(p)
	mustExchange(t, cli, "100.64.2.1:5999", 1000) // allowed now
	if err := orgtest.RoundTrip(c, 1000, 2*time.Second); err == nil {
		t.Fatal("a running flow the new policy denies went on")
	}
	var denied7, passed5999 bool
	for _, f := range gw.flows(t) {
		denied7 = denied7 || (f.DstPort == 7 && f.Verdict == "deny")
		passed5999 = passed5999 || (f.DstPort == 5999 && f.Verdict == "pass")
	}
	if !denied7 || !passed5999 {
		t.Fatalf("flow log: port 7 denied %v, port 5999 passed %v", denied7, passed5999)
	}
}

// TestRelayRestart (issue 30, item 2): a --no-derive relay restarted
// under a TCP connection, on the same address. The client's packets reach
// the new relay, which holds none of the old one's keys: it holds the
// SA's packets (none of pair 1-2 passes unread), tells the client the SA
// is not held (a nudge), the client makes a new SA through it, and the
// relay reads it, all within a second, the connection carrying on. With
// --fail-open it passes the SA's packets unread meanwhile and joins late
// instead: its first proof is accepted.
func TestRelayRestart(t *testing.T) {
	for _, failOpen := range []bool{false, true} {
		t.Run(fmt.Sprintf("fail-open=%v", failOpen), func(t *testing.T) {
			l := newLab(t)
			l.grant("legacy", [2]uint32{1, 2})
			gw := l.gateway("legacy", 1, gwOpts{noDerive: true, failOpen: failOpen})
			addr := gw.RelayAddr()
			cli := l.client("cli", 1, "100.64.1.1/16", addr)
			ping := echoConn(t, cli, "100.64.2.1:7", 30*time.Second)
			if err := ping(); err != nil {
				t.Fatal(err)
			}
			gw.stop()
			gw2 := l.gateway("legacy", 1, gwOpts{noDerive: true, failOpen: failOpen, relay: addr})
			up := time.Now()
			if err := ping(); err != nil {
				t.Fatalf("through the restarted relay: %v", err)
			}
			t.Logf("the connection carried traffic again %v after the relay was back", time.Since(up).Round(time.Millisecond))
			reg := gw2.Metrics().Registry()
			waitFor(t, 15*time.Second, "the restarted relay reads the SA", func() bool {
				if err := ping(); err != nil {
					t.Fatal(err)
				}
				return counter(t, reg, "enclave_gateway_pair_packets_total", map[string]string{"pair": "1-2", "outcome": "read"}) > 0
			})
			readAfter := time.Since(up)
			t.Logf("the restarted relay reads the SA %v after it was back", readAfter.Round(time.Millisecond))
			if readAfter > time.Second {
				t.Errorf("the relay read the SA %v after it was back: more than a second", readAfter)
			}
			srv := l.srv2.Metrics().Gatherer()
			accepted := counter(t, srv, "enclave_agent_intermediary_total", map[string]string{"kind": "rekey_request", "outcome": "accepted"})
			unproven := counter(t, srv, "enclave_agent_intermediary_total", map[string]string{"kind": "rekey_request", "outcome": "unproven"})
			unread := counter(t, reg, "enclave_gateway_pair_packets_total", map[string]string{"pair": "1-2", "outcome": "opaque"})
			if failOpen {
				// Its packets passed unread, and late join got it the keys
				// (or the nudge did first): any proof it sent was taken.
				if unproven != 0 {
					t.Errorf("%v late-join proofs refused", unproven)
				}
				return
			}
			if unread != 0 {
				t.Errorf("%v packets of pair 1-2 passed the restarted relay unread", unread)
			}
			if accepted != 0 || unproven != 0 {
				t.Errorf("rekey requests sent while holding: %v accepted, %v refused", accepted, unproven)
			}
			if n := counter(t, reg, "enclave_gateway_packets_total", map[string]string{"kind": "data", "outcome": "nudged"}); n < 1 {
				t.Errorf("%v nudges", n)
			}
			st := gw2.Status()
			w, ok := st.Blind["1-2"]
			if !ok || w.Last <= 0 || w.Last > 1 || !w.Since.IsZero() {
				t.Errorf("status shows the blind window of pair 1-2 as %+v (%v), want one closed within a second", w, ok)
			}
		})
	}
}

// TestDirectKeyExchangeNoBlindSpot: a gateway that cannot derive reads
// every SA from its first packet: the server holds each grant's Response
// until the SA's keys reached the gateway, so the client cannot send
// before the gateway can read. 50 new SAs in a row, each carrying a
// short TCP exchange at once: no packet of pair 1-2 passes unread (before,
// the keys came about 90 ms after the grant and a short transfer could
// end unread).
func TestDirectKeyExchangeNoBlindSpot(t *testing.T) {
	l := newLab(t)
	l.grant("legacy", [2]uint32{1, 2})
	gw := l.gateway("legacy", 1, gwOpts{noDerive: true})
	reg := gw.Metrics().Registry()
	const sas = 50
	for i := range sas {
		cli := l.client("cli", 1, "100.64.1.1/16", gw.RelayAddr())
		mustExchange(t, cli, "100.64.2.1:7", 2000)
		cli.Close()
		if n := counter(t, reg, "enclave_gateway_pair_packets_total", map[string]string{"pair": "1-2", "outcome": "opaque"}); n != 0 {
			t.Fatalf("SA %d: %v packets of pair 1-2 passed unread", i+1, n)
		}
	}
	read := counter(t, reg, "enclave_gateway_pair_packets_total", map[string]string{"pair": "1-2", "outcome": "read"})
	delivered := counter(t, reg, "enclave_gateway_key_exchange_total", map[string]string{"outcome": "delivered"})
	t.Logf("%d SAs: %v packets read, 0 unread; %v SA keys delivered", sas, read, delivered)
	if delivered < sas {
		t.Fatalf("%v deliveries for %d SAs", delivered, sas)
	}
	if n := counter(t, l.srv2.Metrics().Gatherer(), "enclave_agent_intermediary_total", map[string]string{"kind": "key_exchange", "outcome": "response_released"}); n != 0 {
		t.Fatalf("%v Responses released before their keys were delivered", n)
	}
}

// TestSessionTableBounded: need-key handshakes towards thousands of
// endpoints that never answer keep the gateway's session table within its
// cap and its handshakes in flight within theirs (6,000 junk initiations
// gave 4,228 entries for a cap of 4,096, all retransmitted every second).
func TestSessionTableBounded(t *testing.T) {
	l := newLab(t)
	gw := l.gateway("legacy", 1, gwOpts{noDerive: true})
	// The caps hold whatever the budget of unproven endpoints lets by:
	// lift it here.
	gw.servers.mu.Lock()
	gw.servers.unprovenRate, gw.servers.unprovenBurst = 1e9, 1e9
	gw.servers.unproven.tokens = 1e9
	gw.servers.mu.Unlock()
	gw.amp.prove(netip.MustParseAddr("127.0.0.1")) // and the amplification limit
	for i := range 6000 {
		gw.servers.ensure(gw.Gateway, netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(20000+i)), true, netip.Addr{})
	}
	gw.servers.mu.Lock()
	entries, inFlight := len(gw.servers.byEP), gw.servers.inFlightLocked()
	gw.servers.mu.Unlock()
	if entries > maxSessions || inFlight > maxInFlight {
		t.Fatalf("%d entries (cap %d), %d in flight (cap %d)", entries, maxSessions, inFlight, maxInFlight)
	}
	if n := counter(t, gw.Metrics().Registry(), "enclave_gateway_sessions_total", map[string]string{"outcome": "evicted_in_flight"}); n == 0 {
		t.Fatal("the handshakes that gave way were not counted")
	}
}

// TestUnprovenSessionsBudget (issue 20, item 4): need-key initiations
// towards a thousand endpoints that never answered make the gateway open
// at most its budget of sessions (50, then 20 a second), counted as
// unproven_limited; a server it holds a session with is not charged, so
// a client's SA with it still gets its keys delivered during the flood.
// Before, each junk initiation cost its destination the gateway's own
// initiations (×98 with the tagged one).
func TestUnprovenSessionsBudget(t *testing.T) {
	l := newLab(t)
	l.grant("legacy", [2]uint32{1, 2})
	gw := l.gateway("legacy", 1, gwOpts{noDerive: true})
	reg := gw.Metrics().Registry()
	cli := l.client("cli", 1, "100.64.1.1/16", gw.RelayAddr())
	mustExchange(t, cli, "100.64.2.1:7", 500)
	waitFor(t, 5*time.Second, "keys delivered", func() bool {
		return counter(t, reg, "enclave_gateway_key_exchange_total", map[string]string{"outcome": "delivered"}) >= 1
	})

	start := time.Now()
	for i := range 1000 {
		gw.servers.ensure(gw.Gateway, netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(20000+i)), true, netip.Addr{})
	}
	elapsed := time.Since(start)
	gw.servers.mu.Lock()
	started := len(gw.servers.byEP) - 1 // less the session with srv2
	gw.servers.mu.Unlock()
	limit := unprovenBurst + int(elapsed.Seconds()*unprovenRate) + 1
	limited := counter(t, reg, "enclave_gateway_sessions_total", map[string]string{"outcome": "unproven_limited"})
	t.Logf("1000 junk endpoints in %v: %d sessions started (limit %d), %v limited", elapsed, started, limit, limited)
	if started > limit || int(limited) != 1000-started {
		t.Fatalf("%d sessions started towards junk endpoints (limit %d), %v counted as limited", started, limit, limited)
	}

	// The server's session is proven: a new SA's keys still come.
	cli.Close()
	cli2 := l.client("cli", 1, "100.64.1.1/16", gw.RelayAddr())
	mustExchange(t, cli2, "100.64.2.1:7", 500)
	waitFor(t, 5*time.Second, "keys delivered during the flood", func() bool {
		return counter(t, reg, "enclave_gateway_key_exchange_total", map[string]string{"outcome": "delivered"}) >= 2
	})
}

// TestLateJoinTableNoise: 1,100 forged packets with random SPIs of a
// granted pair, from a few sources, cannot push out an SA that carries
// traffic, nor fill the table: each source holds at most maxPerSource
// places, and noise replaces noise (before, the real SA was never
// joined once the table was full).
func TestLateJoinTableNoise(t *testing.T) {
	var l lateJoin
	l.init()
	refused := 0
	l.refused = func() { refused++ }
	now := time.Now()
	vc := keys.VC{Enclave: 2, Peer: 1, Server: 20}
	real := saKey{vc, 0x80000001}
	client, dst := netip.MustParseAddr("192.0.2.1"), netip.MustParseAddrPort("192.0.2.9:1000")
	icv := make([]byte, 16)
	for iv := uint64(1); iv <= 50; iv++ {
		l.observe(real, client, dst, iv, icv, now)
	}
	for i := range 1100 {
		src := netip.AddrFrom4([4]byte{198, 51, 100, byte(i % 4)}) // four forging sources
		l.observe(saKey{vc, keys.SPI(0x80000100 + i)}, src, dst, 1, icv, now)
	}
	for i := range 2000 { // and many sources, one packet each
		src := netip.AddrFrom4([4]byte{203, 0, byte(i >> 8), byte(i)})
		l.observe(saKey{vc, keys.SPI(0x80100000 + i)}, src, dst, 1, icv, now)
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.m[real] == nil {
		t.Fatal("noise pushed out the SA carrying traffic")
	}
	if len(l.m) > maxCandidates {
		t.Fatalf("%d candidates, cap %d", len(l.m), maxCandidates)
	}
	for src, n := range l.bySource {
		if n > maxPerSource {
			t.Fatalf("%v holds %d places", src, n)
		}
	}
	if refused == 0 {
		t.Fatal("nothing counted as refused")
	}
}

// TestRelayTableNoLockout: junk from 1,500 source ports of one address
// (8-byte datagrams, and well-formed relay headers with junk inside) makes
// no upstream state beyond the source's share, and a real agent that
// comes afterwards is served (before, 1,024 junk datagrams locked every
// agent out for 10 minutes).
func TestRelayTableNoLockout(t *testing.T) {
	l := newLab(t)
	gw := l.gateway("gw1", 1, gwOpts{})
	relay := gw.RelayAddr()
	hdr := make([]byte, control.MaxRelayHeader)
	n, _ := control.PutRelayHeader(hdr, l.srv2.DataPort())
	for i := range 1500 {
		c, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			t.Fatal(err)
		}
		c.WriteToUDPAddrPort(make([]byte, 8), relay)
		c.WriteToUDPAddrPort(append(hdr[:n:n], make([]byte, 40)...), relay)                                                  // data: not a PSP packet
		c.WriteToUDPAddrPort(append(hdr[:n:n], 0x45, 1, 4, 0, 0, 0, 0, 1), netip.AddrPortFrom(relay.Addr(), relay.Port()+1)) // control: a Sealed header, no Initiation
		c.Close()
		if i%100 == 0 {
			time.Sleep(time.Millisecond)
		}
	}
	time.Sleep(200 * time.Millisecond)
	gw.relay.mu.RLock()
	clients := len(gw.relay.clients)
	gw.relay.mu.RUnlock()
	if clients > maxRelayPerSource {
		t.Fatalf("%d upstream pairs after junk (a source's share is %d)", clients, maxRelayPerSource)
	}
	cli := l.client("cli", 1, "100.64.1.1/16", relay)
	mustExchange(t, cli, "100.64.2.1:7", 2000)
}

// TestOpenRelayRefused: a relay with no destinations is refused unless
// the operator says it is meant to be open.
func TestOpenRelayRefused(t *testing.T) {
	l := newLab(t)
	id := ca.Identity{Name: "gw1", Role: ca.RoleGateway, Enclave: 1}
	cfg := Config{Credentials: l.o.Credentials(id), KeyService: l.o.KeyService(id), Relay: netip.MustParseAddrPort("127.0.0.1:0")}
	if _, err := New(cfg); !errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), "--open-relay") {
		t.Fatalf("an open relay without --open-relay: %v", err)
	}
	cfg.OpenRelay = true
	g, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	g.Close()
}

// TestTagBudget: a source gets tagBurst handshakes at once and tagRate a
// second after; another source has its own budget.
func TestTagBudget(t *testing.T) {
	var b budget
	now := time.Now()
	a, other := netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("192.0.2.2")
	n := 0
	for b.allow(a, now) {
		n++
	}
	if n != tagBurst {
		t.Fatalf("%d at once, want %d", n, tagBurst)
	}
	if !b.allow(other, now) {
		t.Fatal("another source shares the budget")
	}
	later := now.Add(100 * time.Millisecond)
	n = 0
	for b.allow(a, later) {
		n++
	}
	if n != tagRate/10 {
		t.Fatalf("%d after 100 ms, want %d", n, tagRate/10)
	}
}
