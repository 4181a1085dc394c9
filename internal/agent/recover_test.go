package agent

import (
	"context"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/enclavekeys/enclave/internal/api"
	"github.com/enclavekeys/enclave/internal/control"
	"github.com/enclavekeys/enclave/internal/keyclient"
	"github.com/enclavekeys/enclave/internal/keys"
)

// udpEcho answers every datagram to port on a's stack.
//
// It returns a stop that closes the socket and waits for the echo's last
// write (also run at cleanup): stop it before a stops, since
// wireguard-go's netstack does not order a write in flight with its
// close.
func udpEcho(t *testing.T, a *Agent, port uint16) (stop func()) {
	t.Helper()
	pc, err := a.Net().ListenUDPAddrPort(netip.AddrPortFrom(a.Addr(), port))
	if err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() {
		defer close(exited)
		buf := make([]byte, 2000)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			pc.WriteTo(buf[:n], from)
		}
	}()
	var once sync.Once
	stop = func() { once.Do(func() { pc.Close(); <-exited }) }
	t.Cleanup(stop)
	return stop
}

// pinging writes "ping" on c every 20 ms until the test ends; the
// cleanup waits for its last write (see udpEcho), so call it after the
// agent c belongs to has started.
func pinging(t *testing.T, c net.Conn) {
	done, exited := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(exited)
		for {
			select {
			case <-done:
				return
			case <-time.After(20 * time.Millisecond):
				c.Write([]byte("ping"))
			}
		}
	}()
	t.Cleanup(func() { close(done); <-exited })
}

// TestServerRestartRecovers: a client sends a datagram every 20 ms on its
// SA; the server agent stops and a new one starts on the same address (a
// restart: none of the old SAs). The new server answers the client's
// packets with UnknownSA, the client makes a new SA, and the echoes come
// back, measured from the new server being up (the goal is 3 s; on the
// code before recovery they never came back while the SA lived).
//
// The client runs on a port of 127.0.0.1 and, as a joined host's default
// is, on 0.0.0.0: a dual-stack socket, whose control messages come from
// IPv4-mapped addresses (issue 32 review: its UnknownSAs were ignored).
func TestServerRestartRecovers(t *testing.T) {
	for _, clientListen := range []string{"127.0.0.1:0", "0.0.0.0:0"} {
		t.Run(clientListen, func(t *testing.T) { serverRestartRecovers(t, netip.MustParseAddrPort(clientListen)) })
	}
}

func serverRestartRecovers(t *testing.T, clientListen netip.AddrPort) {
	o := pairOrg(t)
	sid := serverID("web1", 3, 258, "100.64.3.1/16")
	server, stop := o.startAgent(sid, nil, nil, netip.AddrPort{})
	listen := server.DataPort()
	stopEcho := udpEcho(t, server, 9000)
	client, _ := o.startAgent(clientID("laptop", 7, "100.64.7.1/16"), []Route{route(server)}, nil, clientListen)
	c, err := client.Net().DialUDPAddrPort(netip.AddrPort{}, netip.AddrPortFrom(server.Addr(), 9000))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var last atomic.Int64 // when the last echo came (Unix ns)
	go func() {
		buf := make([]byte, 100)
		for {
			if _, err := c.Read(buf); err != nil {
				return
			}
			last.Store(time.Now().UnixNano())
		}
	}()
	pinging(t, c)
	waitFor(t, 10*time.Second, func() bool { return last.Load() != 0 })
	stopEcho()
	stop()
	time.Sleep(300 * time.Millisecond)
	server2, _ := o.startAgent(sid, nil, nil, listen)
	up := time.Now()
	udpEcho(t, server2, 9000)
	waitFor(t, 10*time.Second, func() bool { return last.Load() > up.UnixNano() })
	t.Logf("echoes again %v after the server came back", time.Unix(0, last.Load()).Sub(up).Round(time.Millisecond))
	if n := metric(t, server2, "enclave_agent_recovery_total", map[string]string{"event": "unknown_sa_sent"}); n < 1 {
		t.Errorf("the new server sent %v UnknownSA messages", n)
	}
	if n := metric(t, client, "enclave_agent_recovery_total", map[string]string{"event": "rekey"}); n < 1 {
		t.Errorf("the client made %v recovery handshakes", n)
	}
}

// TestClientRestartRecovers: the server sends a datagram every 20 ms to
// the client; the client agent stops and a new one starts on the same
// address. The new client meets packets of an SA it does not hold from a
// server it routes to, makes an SA with it, and its keepalive moves the
// server's sending to the new SA (goal: 1 s from the client being up).
func TestClientRestartRecovers(t *testing.T) {
	o := pairOrg(t)
	server := o.agentFor(serverID("web1", 3, 258, "100.64.3.1/16"), nil, nil)
	cid := clientID("laptop", 7, "100.64.7.1/16")
	// The server's service: after a first datagram from the client, it
	// sends to the client's port 9001 every 20 ms.
	pc, err := server.Net().ListenUDPAddrPort(netip.AddrPortFrom(server.Addr(), 9000))
	if err != nil {
		t.Fatal(err)
	}
	done, exited := make(chan struct{}), make(chan struct{})
	defer func() { close(done); pc.Close(); <-exited }() // before the server stops
	go func() {
		defer close(exited)
		buf := make([]byte, 100)
		if _, _, err := pc.ReadFrom(buf); err != nil {
			return
		}
		to := &net.UDPAddr{IP: net.IP(netip.MustParseAddr("100.64.7.1").AsSlice()), Port: 9001}
		for {
			select {
			case <-done:
				return
			case <-time.After(20 * time.Millisecond):
				pc.WriteTo([]byte("data"), to)
			}
		}
	}()
	var last atomic.Int64
	listen := func(a *Agent) {
		l, err := a.Net().ListenUDPAddrPort(netip.AddrPortFrom(a.Addr(), 9001))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { l.Close() })
		go func() {
			buf := make([]byte, 100)
			for {
				if _, _, err := l.ReadFrom(buf); err != nil {
					return
				}
				last.Store(time.Now().UnixNano())
			}
		}()
	}
	client, stop := o.startAgent(cid, []Route{route(server)}, nil, netip.AddrPort{})
	addr := client.DataPort()
	listen(client)
	c, err := client.Net().DialUDPAddrPort(netip.AddrPortFrom(client.Addr(), 9002), netip.AddrPortFrom(server.Addr(), 9000))
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, func() bool {
		c.Write([]byte("start"))
		time.Sleep(50 * time.Millisecond)
		return last.Load() != 0
	})
	c.Close()
	stop()
	time.Sleep(300 * time.Millisecond)
	client2, _ := o.startAgent(cid, []Route{route(server)}, nil, addr)
	up := time.Now()
	listen(client2)
	waitFor(t, 10*time.Second, func() bool { return last.Load() > up.UnixNano() })
	t.Logf("data again %v after the client came back", time.Unix(0, last.Load()).Sub(up).Round(time.Millisecond))
	if n := metric(t, client2, "enclave_agent_recovery_total", map[string]string{"event": "handshake"}); n < 1 {
		t.Errorf("the new client made %v recovery handshakes", n)
	}
	if n := metric(t, server, "enclave_agent_recovery_total", map[string]string{"event": "keepalive_received"}); n < 1 {
		t.Errorf("the server received %v keepalives", n)
	}
}

// TestUnknownSAHintChecked: an UnknownSA message prompts a new handshake
// only when it names the SPI the client sends with and comes from that
// server's address, at most once a second per SA; it never ends the SA or
// moves the route.
func TestUnknownSAHintChecked(t *testing.T) {
	server, client := echoPair(t)
	roundTrip(t, client, netip.AddrPortFrom(server.Addr(), 7), 100)
	client.mu.RLock()
	c := client.t.route[server.Addr()]
	client.mu.RUnlock()
	if c == nil {
		t.Fatal("no SA")
	}
	send := func(from *net.UDPConn, spi keys.SPI) {
		msg, err := control.AppendUnknownSA(nil, uint32(spi))
		if err != nil {
			t.Fatal(err)
		}
		from.WriteToUDPAddrPort(msg, netip.AddrPortFrom(client.DataPort().Addr(), client.DataPort().Port()+1))
	}
	// From elsewhere: ignored, however right the SPI.
	other, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	for range 5 {
		send(other, c.sendSPI)
	}
	waitFor(t, 5*time.Second, func() bool {
		return metric(t, client, "enclave_agent_recovery_total", map[string]string{"event": "unknown_sa_ignored"}) >= 5
	})
	if n := metric(t, client, "enclave_agent_recovery_total", map[string]string{"event": "rekey"}); n != 0 {
		t.Fatalf("a hint from another address prompted %v handshakes", n)
	}
	client.mu.RLock()
	same := client.t.route[server.Addr()] == c && !c.closed.Load()
	client.mu.RUnlock()
	if !same {
		t.Fatal("an unauthenticated hint changed the route or ended the SA")
	}
	roundTrip(t, client, netip.AddrPortFrom(server.Addr(), 7), 100)
}

// TestStartBeforeKeyService: a server agent started while the key service
// is down waits for it (not ready, no error), logs that it is trying
// again, and serves as soon as the service answers.
func TestStartBeforeKeyService(t *testing.T) {
	o := pairOrg(t)
	o.Down()
	sid := serverID("web1", 3, 258, "100.64.3.1/16")
	var logs lockedLog
	cfg := Config{Credentials: o.Credentials(sid), KeyService: o.KeyService(sid), KeyServiceAddr: o.Addr,
		Listen: netip.MustParseAddrPort("127.0.0.1:0"), Logger: slog.New(slog.NewTextHandler(&logs, nil))}
	server, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- server.Run(ctx) }()
	defer func() { cancel(); <-done }()
	select {
	case <-server.Ready():
		t.Fatal("ready without its keys")
	case err := <-done:
		t.Fatalf("Run gave up: %v", err)
	case <-time.After(1500 * time.Millisecond):
	}
	if !strings.Contains(logs.String(), "key service unreachable; trying again") || !strings.Contains(logs.String(), o.Addr) {
		t.Fatalf("no line says the key service is being waited for:\n%s", logs.String())
	}
	o.Up()
	select {
	case <-server.Ready():
	case err := <-done:
		t.Fatalf("Run gave up: %v", err)
	case <-time.After(15 * time.Second):
		t.Fatal("not ready 15 s after the key service came up")
	}
	echoServer(t, server, 7)
	client := o.agentFor(clientID("laptop", 7, "100.64.7.1/16"), []Route{route(server)}, nil)
	roundTrip(t, client, netip.AddrPortFrom(server.Addr(), 7), 1000)
}

// TestKeyServiceOutage: with the key service down, SAs carry traffic and
// new clients get SAs (under the keys and the SPI lease held); once it is
// back, the server's watch reconnects.
func TestKeyServiceOutage(t *testing.T) {
	o := pairOrg(t)
	if _, err := o.Admin.AddDevice(context.Background(), &api.AddDeviceRequest{Name: "phone", Role: "client", Enclave: 7}); err != nil {
		t.Fatal(err)
	}
	server, client := echoPairIn(t, o)
	roundTrip(t, client, netip.AddrPortFrom(server.Addr(), 7), 1000)
	watches := metric(t, server, "enclave_agent_keyservice_requests_total", map[string]string{"rpc": "WatchGenerations"})
	o.Down()
	roundTrip(t, client, netip.AddrPortFrom(server.Addr(), 7), 1000)
	other := o.agentFor(clientID("phone", 7, "100.64.7.2/16"), []Route{route(server)}, nil)
	roundTrip(t, other, netip.AddrPortFrom(server.Addr(), 7), 1000) // a new SA, granted during the outage
	o.Up()
	waitFor(t, 15*time.Second, func() bool {
		return metric(t, server, "enclave_agent_keyservice_requests_total", map[string]string{"rpc": "WatchGenerations"}) > watches
	})
	roundTrip(t, client, netip.AddrPortFrom(server.Addr(), 7), 1000)
}

// lockedLog is a log buffer safe for the agent's goroutines.
type lockedLog struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *lockedLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedLog) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// TestRevokedSelfStops (issue 32, item 5): a client whose device an admin
// revokes hears it on its watch stream: its SAs end, it makes no new one
// (its packets are counted as dropped, revoked), status says revoked with
// why, and it asks the key service nothing more, instead of retrying for
// ever while status said reconnecting.
func TestRevokedSelfStops(t *testing.T) {
	o := pairOrg(t)
	server := o.agentFor(serverID("web1", 3, 258, "100.64.3.1/16"), nil, nil)
	echoServer(t, server, 7)
	cid := clientID("laptop", 7, "100.64.7.1/16")
	client := o.agentFor(cid, []Route{route(server)}, func(c *Config) { c.KeyService, c.KeyServiceAddr = o.KeyService(cid), o.Addr })
	roundTrip(t, client, netip.AddrPortFrom(server.Addr(), 7), 100)
	waitFor(t, 10*time.Second, func() bool { return client.Status().KeyService.State == keyclient.Watching })
	if _, err := o.Admin.RevokeDevice(context.Background(), &api.RevokeDeviceRequest{Name: "laptop"}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, func() bool { return client.Status().KeyService.State == keyclient.Revoked })
	if st := client.Status(); len(st.Peers) != 0 || !strings.Contains(st.KeyService.LastError, "revoked") {
		t.Fatalf("a revoked client's status: %+v %+v", st.Peers, st.KeyService)
	}
	watches := metric(t, client, "enclave_agent_keyservice_requests_total", map[string]string{"rpc": "WatchGenerations"})
	c, err := client.Net().DialUDPAddrPort(netip.AddrPort{}, netip.AddrPortFrom(server.Addr(), 9))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write([]byte("anyone?"))
	waitFor(t, 5*time.Second, func() bool {
		return metric(t, client, "enclave_agent_drops_total", map[string]string{"cause": "revoked"}) >= 1
	})
	time.Sleep(3 * time.Second) // a reconnecting client would have asked again by now
	if n := metric(t, client, "enclave_agent_keyservice_requests_total", map[string]string{"rpc": "WatchGenerations"}); n != watches {
		t.Fatalf("a revoked client asked the key service %v more times", n-watches)
	}
}
