package gateway

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/enclavekeys/enclave/internal/agent"
	"github.com/enclavekeys/enclave/internal/api"
	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/handshake"
	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/orgtest"
)

// lab is a small org for the gateway's tests, all in process on loopback:
// a real key service, server agents on netstack in enclaves 2 and 3 with
// echo services, client agents in enclave 1 (or none), and relay gateways.
//
//	cli (enclave 1) ──via──> gateway (relay, enclave 1) ──> srv2 (enclave 2)
//	                                                    └─> srv3 (enclave 3)
type lab struct {
	t          *testing.T
	o          *orgtest.Org
	srv2, srv3 *agent.Agent
}

func newLab(t *testing.T) *lab {
	t.Helper()
	o := orgtest.New(t, 5*time.Second)
	o.Register([]uint32{1, 2, 3},
		[]*api.AddDeviceRequest{
			{Name: "srv2", Role: "server", Enclave: 2, ServerId: orgtest.U32(20)},
			{Name: "srv3", Role: "server", Enclave: 3, ServerId: orgtest.U32(30)},
			{Name: "cli", Role: "client", Enclave: 1},
			{Name: "nomad", Role: "client"},
			{Name: "gw1", Role: "gateway", Enclave: 1},
			{Name: "gw2", Role: "gateway", Enclave: 2},
			{Name: "legacy", Role: "gateway", Enclave: 1},
		},
		[][2]uint32{{1, 2}, {1, 3}})
	l := &lab{t: t, o: o}
	l.srv2 = l.agent(ca.Identity{Name: "srv2", Role: ca.RoleServer, Enclave: 2, ServerID: 20, HasServerID: true, Overlay: netip.MustParsePrefix("100.64.2.1/16")}, nil, netip.AddrPort{})
	l.srv3 = l.agent(ca.Identity{Name: "srv3", Role: ca.RoleServer, Enclave: 3, ServerID: 30, HasServerID: true, Overlay: netip.MustParsePrefix("100.64.3.1/16")}, nil, netip.AddrPort{})
	for _, s := range []*agent.Agent{l.srv2, l.srv3} {
		echoOn(t, s, 7)
		echoOn(t, s, 5999)
	}
	return l
}

// grant gives a gateway pairs.
func (l *lab) grant(device string, pairs ...[2]uint32) {
	l.t.Helper()
	req := &api.AddGrantRequest{Device: device}
	for _, p := range pairs {
		req.Pairs = append(req.Pairs, &api.Pair{A: p[0], B: p[1]})
	}
	if _, err := l.o.Admin.AddGrant(context.Background(), req); err != nil {
		l.t.Fatal(err)
	}
}

// agent starts an agent for id routed to the servers, through the relay
// via when it is set.
func (l *lab) agent(id ca.Identity, routes []agent.Route, via netip.AddrPort) *agent.Agent {
	l.t.Helper()
	return l.agentWith(l.o.Credentials(id), id, routes, via)
}

func (l *lab) agentWith(creds *handshake.Credentials, id ca.Identity, routes []agent.Route, via netip.AddrPort) *agent.Agent {
	l.t.Helper()
	cfg := agent.Config{Credentials: creds, Routes: routes, Via: via}
	if id.Role == ca.RoleServer {
		cfg.KeyService = l.o.KeyService(id)
	}
	var a *agent.Agent
	var err error
	for try := 0; ; try++ {
		cfg.Listen = netip.MustParseAddrPort("127.0.0.1:0")
		if a, err = agent.New(cfg); err == nil {
			break
		}
		if try > 50 {
			l.t.Fatal(err)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	l.t.Cleanup(func() { cancel(); <-done })
	select {
	case <-a.Ready():
	case err := <-done:
		l.t.Fatalf("agent did not start: %v", err)
	}
	return a
}

// client starts a client agent routed to both servers through via.
func (l *lab) client(name string, enclave keys.EnclaveID, overlay string, via netip.AddrPort) *agent.Agent {
	l.t.Helper()
	return l.agent(ca.Identity{Name: name, Role: ca.RoleClient, Enclave: enclave, Overlay: netip.MustParsePrefix(overlay)}, l.routes(), via)
}

func (l *lab) routes() []agent.Route {
	return []agent.Route{
		{Prefix: netip.MustParsePrefix("100.64.2.1/32"), Endpoint: l.srv2.DataPort()},
		{Prefix: netip.MustParsePrefix("100.64.3.1/32"), Endpoint: l.srv3.DataPort()},
	}
}

// gwOpts tweak a gateway's configuration.
type gwOpts struct {
	noDerive bool
	failOpen bool
	policy   string
	flowLog  bool
	capture  bool
	creds    *handshake.Credentials
	relayTo  []netip.Prefix
	relay    netip.AddrPort // the relay's address (zero: a free port)
}

// testGateway is a running relay gateway and where its outputs go.
type testGateway struct {
	*Gateway
	flowLog, capture string
	stop             func()
}

func (l *lab) gateway(name string, enclave keys.EnclaveID, o gwOpts) *testGateway {
	l.t.Helper()
	id := ca.Identity{Name: name, Role: ca.RoleGateway, Enclave: enclave}
	creds := o.creds
	if creds == nil {
		creds = l.o.Credentials(id)
	}
	cfg := Config{Credentials: creds, KeyService: l.o.KeyService(id), NoDerive: o.noDerive, FailOpen: o.failOpen,
		Relay: netip.MustParseAddrPort("127.0.0.1:0"), RelayTo: o.relayTo, OpenRelay: len(o.relayTo) == 0, FlowIdle: time.Hour}
	if o.relay.IsValid() {
		cfg.Relay = o.relay
	}
	tg := &testGateway{}
	dir := l.t.TempDir()
	if o.policy != "" {
		p, err := ParsePolicy([]byte(o.policy))
		if err != nil {
			l.t.Fatal(err)
		}
		cfg.Policy = p
	}
	var files []*os.File
	open := func(path string) io.Writer {
		f, err := os.Create(path)
		if err != nil {
			l.t.Fatal(err)
		}
		files = append(files, f)
		return f
	}
	if o.flowLog {
		tg.flowLog = filepath.Join(dir, "flows.jsonl")
		cfg.FlowLog = open(tg.flowLog)
	}
	if o.capture {
		tg.capture = filepath.Join(dir, "inner.pcapng")
		cfg.Capture = open(tg.capture)
	}
	var g *Gateway
	var err error
	for try := 0; ; try++ {
		if g, err = New(cfg); err == nil {
			break
		}
		if try > 50 {
			l.t.Fatal(err)
		}
		if o.relay.IsValid() {
			time.Sleep(20 * time.Millisecond) // the old instance's ports may linger a moment
		}
	}
	tg.Gateway = g
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- g.Run(ctx) }()
	var once sync.Once
	tg.stop = func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				l.t.Errorf("gateway %s: %v", name, err)
			}
			for _, f := range files {
				f.Close()
			}
		})
	}
	l.t.Cleanup(tg.stop)
	select {
	case <-g.Ready():
	case err := <-done:
		l.t.Fatalf("gateway did not start: %v", err)
	}
	return tg
}

// flows stops the gateway and reads its flow log.
func (tg *testGateway) flows(t *testing.T) []FlowRecord {
	t.Helper()
	tg.stop()
	f, err := os.Open(tg.flowLog)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []FlowRecord
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var r FlowRecord
		if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
			t.Fatalf("flow log line %q: %v", sc.Text(), err)
		}
		out = append(out, r)
	}
	return out
}

// echoOn serves TCP echo on the agent's stack at port.
func echoOn(t *testing.T, a *agent.Agent, port uint16) {
	t.Helper()
	ln, err := a.Net().ListenTCPAddrPort(netip.AddrPortFrom(a.Addr(), port))
	if err != nil {
		t.Fatal(err)
	}
	orgtest.Echo(t, ln)
}

// exchange sends n bytes to the echo service at to through the client's
// stack and reads them back; it returns the error instead of failing.
func exchange(client *agent.Agent, to netip.AddrPort, n int, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	c, err := client.Net().DialContextTCPAddrPort(ctx, to)
	if err != nil {
		return err
	}
	defer c.Close()
	return orgtest.RoundTrip(c, n, timeout)
}

func mustExchange(t *testing.T, client *agent.Agent, to string, n int) {
	t.Helper()
	if err := exchange(client, netip.MustParseAddrPort(to), n, 10*time.Second); err != nil {
		t.Fatalf("exchange with %s: %v", to, err)
	}
}

// counter reads a counter (summed over the series whose labels include
// the given ones) from a registry.
func counter(t *testing.T, reg prometheus.Gatherer, name string, labels map[string]string) float64 {
	t.Helper()
	return orgtest.Counter(t, reg, name, labels)
}

func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not in %v", what, d)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// echoConn opens a TCP connection from client to an echo service, closed
// when the test ends, and returns a ping over it: a short message echoed.
func echoConn(t *testing.T, client *agent.Agent, to string, timeout time.Duration) func() error {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	conn, err := client.Net().DialContextTCPAddrPort(ctx, netip.MustParseAddrPort(to))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	conn.SetDeadline(time.Now().Add(timeout))
	return func() error {
		msg := []byte("still here")
		if _, err := conn.Write(msg); err != nil {
			return err
		}
		got := make([]byte, len(msg))
		if _, err := io.ReadFull(conn, got); err != nil || string(got) != string(msg) {
			return fmt.Errorf("echo: %q %v", got, err)
		}
		return nil
	}
}
