package agent

import (
	"context"
	"encoding/binary"
	"io"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/enclavekeys/enclave/internal/api"
	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/orgtest"
	"github.com/enclavekeys/enclave/internal/packet"
)

// pairOrg registers enclaves 3 and 7, a server web1 in 3 and a client
// laptop in 7, with pair 3-7 allowed.
func pairOrg(t testing.TB) *org {
	o := newOrg(t, 2*time.Second)
	o.Register([]uint32{3, 7, 9},
		[]*api.AddDeviceRequest{
			{Name: "web1", Role: "server", Enclave: 3, ServerId: u32(258)},
			{Name: "laptop", Role: "client", Enclave: 7},
			{Name: "lab", Role: "client", Enclave: 9},
		},
		[][2]uint32{{3, 7}})
	return o
}

// echoServer accepts TCP connections on the agent's stack at port and
// echoes what it reads.
func echoServer(t testing.TB, a *Agent, port uint16) {
	t.Helper()
	ln, err := a.Net().ListenTCPAddrPort(netip.AddrPortFrom(a.Addr(), port))
	if err != nil {
		t.Fatal(err)
	}
	orgtest.Echo(t, ln)
}

// roundTrip dials the echo server through the client's stack and checks
// n bytes come back.
func roundTrip(t *testing.T, client *Agent, to netip.AddrPort, n int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := client.Net().DialContextTCPAddrPort(ctx, to)
	if err != nil {
		t.Fatalf("dial %s: %v", to, err)
	}
	defer c.Close()
	if err := orgtest.RoundTrip(c, n, 10*time.Second); err != nil {
		t.Fatal(err)
	}
}

// echoPair is a server agent with an echo service on port 7 and a client
// agent routed to it.
func echoPair(t *testing.T) (server, client *Agent) {
	t.Helper()
	return echoPairIn(t, pairOrg(t))
}

// echoPairIn is echoPair in an org of the caller's.
func echoPairIn(t *testing.T, o *org) (server, client *Agent) {
	t.Helper()
	server = o.agentFor(serverID("web1", 3, 258, "100.64.3.1/16"), nil, nil)
	echoServer(t, server, 7)
	client = o.agentFor(clientID("laptop", 7, "100.64.7.1/16"), []Route{route(server)}, nil)
	return server, client
}

// ipv4Packet is an IPv4 UDP packet of n bytes from src to dst (enough of
// one for the agent's checks).
func ipv4Packet(src, dst netip.Addr, n int) []byte {
	p := make([]byte, n)
	p[0], p[9] = 0x45, 17
	binary.BigEndian.PutUint16(p[2:], uint16(n))
	copy(p[12:16], src.AsSlice())
	copy(p[16:20], dst.AsSlice())
	return p
}

func TestTwoAgentsTCP(t *testing.T) {
	server, client := echoPair(t)
	roundTrip(t, client, netip.AddrPortFrom(server.Addr(), 7), 100_000)
	if client.SAs() != 1 || server.SAs() != 1 {
		t.Fatalf("SAs: client %d, server %d", client.SAs(), server.SAs())
	}
}

// metric reads a counter of the agent's metrics by name and labels.
func metric(t *testing.T, a *Agent, name string, labels map[string]string) float64 {
	t.Helper()
	return orgtest.Counter(t, a.Metrics().Gatherer(), name, labels)
}

func TestUDP(t *testing.T) {
	o := pairOrg(t)
	server := o.agentFor(serverID("web1", 3, 258, "100.64.3.1/16"), nil, nil)
	udpEcho(t, server, 53)
	client := o.agentFor(clientID("laptop", 7, "100.64.7.1/16"), []Route{route(server)}, nil)
	c, err := client.Net().DialUDPAddrPort(netip.AddrPort{}, netip.AddrPortFrom(server.Addr(), 53))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	buf := make([]byte, 2000)
	for i := 0; i < 20; i++ { // the first datagrams may wait for the SA
		c.Write([]byte("ping"))
		c.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
		if n, err := c.Read(buf); err == nil && string(buf[:n]) == "ping" {
			return
		}
	}
	t.Fatal("no UDP answer through the SA")
}

// TestRefusedPair: a client of an enclave the server may not talk to gets
// a refusal with its reason, and no SA.
func TestRefusedPair(t *testing.T) {
	o := pairOrg(t)
	server := o.agentFor(serverID("web1", 3, 258, "100.64.3.1/16"), nil, nil)
	echoServer(t, server, 7)
	lab := o.agentFor(clientID("lab", 9, "100.64.9.1/16"), []Route{route(server)}, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if c, err := lab.Net().DialContextTCPAddrPort(ctx, netip.AddrPortFrom(server.Addr(), 7)); err == nil {
		c.Close()
		t.Fatal("a client of enclave 9 reached a server of enclave 3")
	}
	waitFor(t, 5*time.Second, func() bool {
		return metric(t, lab, "enclave_agent_handshakes_total", map[string]string{"result": "refused", "reason": "policy"}) > 0
	})
	if server.SAs() != 0 || lab.SAs() != 0 {
		t.Fatal("an SA exists for a refused pair")
	}
	if metric(t, server, "enclave_agent_handshakes_total", map[string]string{"side": "responder", "result": "refused", "reason": "policy"}) == 0 {
		t.Fatal("the server did not count the refusal")
	}
}

// TestRevokedClient: revoking a client ends its SA on the server within
// seconds, and its next handshake is refused.
func TestRevokedClient(t *testing.T) {
	o := pairOrg(t)
	server := o.agentFor(serverID("web1", 3, 258, "100.64.3.1/16"), nil, nil)
	echoServer(t, server, 7)
	client := o.agentFor(clientID("laptop", 7, "100.64.7.1/16"), []Route{route(server)}, nil)
	roundTrip(t, client, netip.AddrPortFrom(server.Addr(), 7), 1000)
	begin := time.Now()
	if _, err := o.Admin.RevokeDevice(context.Background(), &api.RevokeDeviceRequest{Name: "laptop"}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, func() bool { return server.SAs() == 0 && client.SAs() == 0 })
	t.Logf("SAs gone %v after the revocation", time.Since(begin).Round(time.Millisecond))
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if c, err := client.Net().DialContextTCPAddrPort(ctx, netip.AddrPortFrom(server.Addr(), 7)); err == nil {
		c.Close()
		t.Fatal("a revoked client connected again")
	}
	waitFor(t, 5*time.Second, func() bool {
		return metric(t, server, "enclave_agent_handshakes_total", map[string]string{"result": "refused", "reason": "revoked"}) > 0
	})
}

// TestRotationNoLoss: a rotation of the pair while a client sends a steady
// stream of numbered datagrams: the server fetches its new keys and asks
// the client to re-establish, the new SA takes over before the old one
// ends, and every datagram arrives.
func TestRotationNoLoss(t *testing.T) {
	o := pairOrg(t)
	server := o.agentFor(serverID("web1", 3, 258, "100.64.3.1/16"), nil, nil)
	pc, err := server.Net().ListenUDPAddrPort(netip.AddrPortFrom(server.Addr(), 9000))
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	got := make(chan uint32, 100000)
	go func() {
		buf := make([]byte, 64)
		for {
			n, _, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			if n == 4 {
				got <- binary.BigEndian.Uint32(buf)
			}
		}
	}()
	client := o.agentFor(clientID("laptop", 7, "100.64.7.1/16"), []Route{route(server)}, nil)
	c, err := client.Net().DialUDPAddrPort(netip.AddrPort{}, netip.AddrPortFrom(server.Addr(), 9000))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	// Bring the SA up before counting.
	roundTripUDPReady(t, c, got)
	time.Sleep(2 * time.Second) // past the pair's grace, so the rotation happens now
	const total = 1500
	sent := make(chan struct{})
	go func() {
		defer close(sent)
		for i := uint32(1); i <= total; i++ {
			var b [4]byte
			binary.BigEndian.PutUint32(b[:], i)
			c.Write(b[:])
			time.Sleep(2 * time.Millisecond)
		}
	}()
	time.Sleep(time.Second)
	fetches := metric(t, server, "enclave_agent_keyservice_requests_total", map[string]string{"rpc": "GetServerKeys"})
	r, err := o.Admin.Rotate(context.Background(), &api.RotateRequest{Pair: &api.Pair{A: 3, B: 7}})
	if err != nil || r.Rotations[0].Outcome != "rotated" {
		t.Fatalf("rotate: %+v %v", r, err)
	}
	<-sent
	if n := metric(t, server, "enclave_agent_keyservice_requests_total", map[string]string{"rpc": "GetServerKeys"}); n != fetches+1 {
		t.Errorf("the rotation cost the server %v key fetches, want 1", n-fetches)
	}
	seen := map[uint32]bool{}
	deadline := time.After(5 * time.Second)
	for len(seen) < total {
		select {
		case v := <-got:
			if v >= 1 && v <= total {
				seen[v] = true
			}
		case <-deadline:
			t.Fatalf("%d of %d datagrams arrived across the rotation", len(seen), total)
		}
	}
	if n := metric(t, client, "enclave_agent_handshakes_total", map[string]string{"side": "initiator", "result": "ok"}); n < 2 {
		t.Fatalf("the client made %v SAs; the rotation should have made a second", n)
	}
}

// TestIdleTimeout: a server ends an SA that received nothing for its idle
// timeout, counts it, and tells the client, whose next packet makes a new
// SA.
func TestIdleTimeout(t *testing.T) {
	o := pairOrg(t)
	server := o.agentFor(serverID("web1", 3, 258, "100.64.3.1/16"), nil, func(c *Config) { c.IdleTimeout = 600 * time.Millisecond })
	echoServer(t, server, 7)
	client := o.agentFor(clientID("laptop", 7, "100.64.7.1/16"), []Route{route(server)}, nil)
	roundTrip(t, client, netip.AddrPortFrom(server.Addr(), 7), 100)
	waitFor(t, 5*time.Second, func() bool { return server.SAs() == 0 && client.SAs() == 0 })
	if n := metric(t, server, "enclave_agent_sas_ended_total", map[string]string{"reason": "idle"}); n != 1 {
		t.Fatalf("%v SAs ended for idleness, want 1", n)
	}
	roundTrip(t, client, netip.AddrPortFrom(server.Addr(), 7), 100)
	if n := metric(t, client, "enclave_agent_handshakes_total", map[string]string{"side": "initiator", "result": "ok"}); n != 2 {
		t.Fatalf("%v handshakes, want a second after the idle end", n)
	}
}

// roundTripUDPReady sends marker datagrams until one arrives: the SA is up.
func roundTripUDPReady(t *testing.T, c net.Conn, got chan uint32) {
	t.Helper()
	for i := 0; i < 50; i++ {
		var b [4]byte
		binary.BigEndian.PutUint32(b[:], 1<<31)
		c.Write(b[:])
		select {
		case v := <-got:
			if v == 1<<31 {
				return
			}
		case <-time.After(200 * time.Millisecond):
		}
	}
	t.Fatal("the SA did not come up")
}

// TestTwentyAgents: five servers in enclave 3 and fifteen clients in
// enclave 7; every client reaches every server.
func TestTwentyAgents(t *testing.T) {
	o := newOrg(t, 2*time.Second)
	var devices []*api.AddDeviceRequest
	for i := 1; i <= 5; i++ {
		devices = append(devices, &api.AddDeviceRequest{Name: "srv" + itoa(uint32(i)), Role: "server", Enclave: 3, ServerId: u32(uint32(100 + i))})
	}
	for i := 1; i <= 15; i++ {
		devices = append(devices, &api.AddDeviceRequest{Name: "cli" + itoa(uint32(i)), Role: "client", Enclave: 7})
	}
	o.Register([]uint32{3, 7}, devices, [][2]uint32{{3, 7}})
	var servers []*Agent
	var routes []Route
	for i := 1; i <= 5; i++ {
		s := o.agentFor(serverID("srv"+itoa(uint32(i)), 3, keys.ServerID(100+i), "100.64.3."+itoa(uint32(i))+"/16"), nil, nil)
		echoServer(t, s, 7)
		servers = append(servers, s)
		routes = append(routes, route(s))
	}
	var wg sync.WaitGroup
	errs := make(chan string, 100)
	for i := 1; i <= 15; i++ {
		c := o.agentFor(clientID("cli"+itoa(uint32(i)), 7, "100.64.7."+itoa(uint32(i))+"/16"), routes, nil)
		wg.Add(1)
		go func() {
			defer wg.Done()
			for _, s := range servers {
				ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
				conn, err := c.Net().DialContextTCPAddrPort(ctx, netip.AddrPortFrom(s.Addr(), 7))
				cancel()
				if err != nil {
					errs <- err.Error()
					continue
				}
				conn.SetDeadline(time.Now().Add(20 * time.Second))
				conn.Write([]byte("hello"))
				buf := make([]byte, 5)
				if _, err := io.ReadFull(conn, buf); err != nil || string(buf) != "hello" {
					errs <- "echo failed"
				}
				conn.Close()
			}
		}()
	}
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Error(e)
	}
	total := 0
	for _, s := range servers {
		total += s.SAs()
	}
	if total != 75 {
		t.Fatalf("%d SAs on the servers, want 75", total)
	}
}

// TestNoAllocsPerPacket: on an established SA, sealing and sending a
// packet, and opening a received one (lookup, authentication, replay
// window, source check), allocate nothing. (Handing the inner packet to
// the network stack is the stack's own business.)
func TestNoAllocsPerPacket(t *testing.T) {
	server, client := echoPair(t)
	roundTrip(t, client, netip.AddrPortFrom(server.Addr(), 7), 1000)
	inner := ipv4Packet(client.Addr(), server.Addr(), 1000)
	buf := make([]byte, packet.Overhead+len(inner))
	client.mu.RLock()
	c := client.t.route[server.Addr()]
	client.mu.RUnlock()
	// The packets go to a socket nobody reads while the send path is
	// measured: AllocsPerRun counts the whole process, and the server's
	// stack answering them would be counted too.
	sink, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer sink.Close()
	ep := c.dataEndpoint()
	c.setEndpoint(sink.LocalAddr().(*net.UDPAddr).AddrPort())
	if n := testing.AllocsPerRun(200, func() {
		copy(buf[packet.HeaderLen:], inner)
		client.send(buf, len(inner))
	}); n != 0 {
		t.Errorf("send: %v allocations per packet", n)
	}
	c.setEndpoint(ep)
	pkts := make([][]byte, 300)
	for i := range pkts {
		b := make([]byte, packet.Overhead+len(inner))
		copy(b[packet.HeaderLen:], inner)
		pkt, err := c.out.Seal(b, packet.NextIPv4, b[packet.HeaderLen:packet.HeaderLen+len(inner)])
		if err != nil {
			t.Fatal(err)
		}
		pkts[i] = pkt
	}
	src := c.dataEndpoint()
	server.mu.RLock()
	for _, sc := range server.t.bySPI {
		src = sc.dataEndpoint() // where the server believes the client is
	}
	server.mu.RUnlock()
	var p packet.Parsed
	i := 0
	into := make([]byte, 0, 2048)
	for _, dst := range [][]byte{nil, into} { // in place, and into the stack's buffer
		if n := testing.AllocsPerRun(100, func() {
			if _, err := server.open(dst, &p, pkts[i], src); err != nil {
				t.Fatal(err)
			}
			i++
		}); n != 0 {
			t.Errorf("receive (into %d bytes of room): %v allocations per packet", cap(dst), n)
		}
	}
}

// TestRekeyTriggers: an SA is re-established before its lifetime ends and
// after its IV threshold, each time without breaking the connection.
func TestRekeyTriggers(t *testing.T) {
	o := pairOrg(t)
	server := o.agentFor(serverID("web1", 3, 258, "100.64.3.1/16"), nil, func(c *Config) { c.Lifetime = 3 * time.Second })
	echoServer(t, server, 7)
	client := o.agentFor(clientID("laptop", 7, "100.64.7.1/16"), []Route{route(server)}, func(c *Config) { c.RekeyAfter = 200 })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := client.Net().DialContextTCPAddrPort(ctx, netip.AddrPortFrom(server.Addr(), 7))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(20 * time.Second))
	ok := func() float64 {
		return metric(t, client, "enclave_agent_handshakes_total", map[string]string{"side": "initiator", "result": "ok"})
	}
	// 300 small echoes pass the IV threshold of 200.
	buf := make([]byte, 16)
	for i := 0; i < 300; i++ {
		if _, err := conn.Write(buf); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(conn, buf); err != nil {
			t.Fatal(err)
		}
	}
	if ok() < 2 {
		t.Fatalf("%v SAs made after the IV threshold", ok())
	}
	// Quiet for longer than the lifetime: the SA is replaced before it ends,
	// and the same connection still works.
	before := ok()
	time.Sleep(4 * time.Second)
	if _, err := conn.Write(buf); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(conn, buf); err != nil {
		t.Fatalf("after the lifetime: %v", err)
	}
	if ok() <= before {
		t.Fatal("no new SA before the lifetime ended")
	}
}

// TestOversizeInner: an authentic packet whose inner packet is larger than
// the receiving stack's MTU is a counted drop, and the SA goes on working.
func TestOversizeInner(t *testing.T) {
	server, client := echoPair(t)
	roundTrip(t, client, netip.AddrPortFrom(server.Addr(), 7), 100)
	inner := ipv4Packet(client.Addr(), server.Addr(), DefaultMTU+500)
	// Sealed here: the client's own send path would fragment it.
	client.mu.RLock()
	c := client.t.route[server.Addr()]
	client.mu.RUnlock()
	buf := make([]byte, packet.Overhead+len(inner))
	copy(buf[packet.HeaderLen:], inner)
	pkt, err := c.out.Seal(buf, packet.NextIPv4, buf[packet.HeaderLen:packet.HeaderLen+len(inner)])
	if err != nil {
		t.Fatal(err)
	}
	if _, err := client.data.WriteToUDPAddrPort(pkt, c.dataEndpoint()); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for metric(t, server, "enclave_agent_drops_total", map[string]string{"cause": "oversize"}) != 1 {
		if time.Now().After(deadline) {
			t.Fatal("the oversize packet was not counted as dropped")
		}
		time.Sleep(10 * time.Millisecond)
	}
	roundTrip(t, client, netip.AddrPortFrom(server.Addr(), 7), 100)
}

// TestListenPairTakesAFreePair (issue 32, item 7): port 0 gets a data and
// a control port side by side even when the port after the kernel's first
// pick is taken: here every odd port of a run is held, and agents still
// start.
func TestListenPairTakesAFreePair(t *testing.T) {
	var held []*net.UDPConn
	defer func() {
		for _, c := range held {
			c.Close()
		}
	}()
	// Hold the port after each of many ephemeral picks.
	for range 200 {
		c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			t.Fatal(err)
		}
		p := c.LocalAddr().(*net.UDPAddr).Port
		c.Close()
		if n, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: p + 1}); err == nil {
			held = append(held, n)
		}
	}
	for range 20 {
		data, ctrl, err := listenPair(netip.MustParseAddrPort("127.0.0.1:0"))
		if err != nil {
			t.Fatalf("with %d ports held: %v", len(held), err)
		}
		if dp, cp := data.LocalAddr().(*net.UDPAddr).Port, ctrl.LocalAddr().(*net.UDPAddr).Port; cp != dp+1 {
			t.Fatalf("data %d, control %d", dp, cp)
		}
		data.Close()
		ctrl.Close()
	}
	if _, _, err := listenPair(netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(held[0].LocalAddr().(*net.UDPAddr).Port-1))); err == nil {
		t.Fatal("a given port whose next one is taken was accepted")
	}
}
