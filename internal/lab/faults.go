package lab

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/enclavekeys/enclave/internal/agent"
	"github.com/enclavekeys/enclave/internal/api"
	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/gateway"
	"github.com/enclavekeys/enclave/internal/handshake"
	"github.com/enclavekeys/enclave/internal/registry"
)

// The faults scenario (enclave lab --faults): a small organisation in
// this process under continuous traffic, and each fault of the failure
// model (docs/ARCHITECTURE.md) in turn, with what it cost. The traffic is
// a numbered datagram every 20 ms from the client through a relay gateway
// to the server's UDP echo, and a TCP connection carrying a message every
// 100 ms. For each fault the report gives the datagrams sent and lost
// while it ran, the longest gap between echoes, the time from the
// restarted component being up to the first echo (the goal of each), and
// whether the TCP connection carried on.

// Goals of the faults (the issue's; the report says whether each was met).
const (
	goalServerRestart = 3 * time.Second
	goalClientRestart = time.Second
	goalRelayRestart  = time.Second
	goalChange        = 2 * time.Second
	// recoverWithin fails a step: no recovery at all in this long.
	recoverWithin = 15 * time.Second
	// downFor is how long a restarted component is away (the datagrams
	// sent meanwhile are lost by definition: about 15).
	downFor = 300 * time.Millisecond
)

// faultOrg is the faults scenario's organisation: what it restarts.
type faultOrg struct {
	s                  *scenario
	srvCreds, cliCreds *handshake.Credentials
	gwCreds            *handshake.Credentials
	srvAddr, cliAddr   netip.AddrPort
	relay              netip.AddrPort
	stopSrv, stopCli   func()
	stopGw             func()
	gw                 *gateway.Gateway
	p                  *probe
}

var (
	faultSrv  = ca.Identity{Name: "srv", Role: ca.RoleServer, Enclave: 2, ServerID: 20, HasServerID: true, Overlay: ip("100.64.2.20/16")}
	faultSrv3 = ca.Identity{Name: "srv3", Role: ca.RoleServer, Enclave: 3, ServerID: 30, HasServerID: true, Overlay: ip("100.64.3.30/16")}
	faultCli  = ca.Identity{Name: "cli", Role: ca.RoleClient, Enclave: 1, Overlay: ip("100.64.1.10/16")}
	faultNew  = ca.Identity{Name: "phone", Role: ca.RoleClient, Enclave: 1, Overlay: ip("100.64.1.11/16")}
	faultGw   = ca.Identity{Name: "gw", Role: ca.RoleGateway, Enclave: 1}
)

// RunFaults runs the faults scenario and returns its report.
func RunFaults(ctx context.Context, cfg Config) (*Report, error) {
	s, end, err := begin(ctx, cfg, "enclave-faults-")
	if err != nil {
		return nil, err
	}
	defer end()
	defer s.o.stop()
	f := &faultOrg{s: s}
	defer func() {
		if f.p != nil {
			f.p.close()
		}
	}()
	s.a, s.gw = map[string]*agent.Agent{}, map[string]*gateway.Gateway{}
	s.step("organisation under traffic", "a key server, a server behind a relay gateway, a client sending 50 datagrams a second and a TCP message every 100 ms", true, f.setup)
	s.step("key service down", "the key service stops answering for 3 s: SAs carry on, a new client gets an SA (goal: nothing lost)", false, f.keyServiceDown)
	s.step("policy reload", "the gateway's policy is replaced under traffic (goal: nothing lost)", false, f.policyReload)
	s.step("registry change", "a pair allowed, then forbidden, while the server runs (goal: each in effect within 2 s)", false, f.registryChange)
	s.step("relay gateway restart", "the relay stops and starts again on its address (goal: traffic within 1 s of it being up)", false, f.relayRestart)
	s.step("server restart", "the server agent stops and a new one starts on its address, with none of its SAs (goal: traffic within 3 s)", false, f.serverRestart)
	s.step("client restart", "the client agent stops and starts again (goal: traffic within 1 s of it being up)", false, f.clientRestart)
	return s.finish(), nil
}

func (f *faultOrg) setup(st *Step) error {
	s, o := f.s, f.s.o
	if err := o.startOrgTier(s.ctx, "ks-org", registry.Rotation{Interval: labInterval, Grace: labGrace}); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(s.ctx, 20*time.Second)
	defer cancel()
	for _, e := range []uint32{1, 2, 3} {
		if _, err := o.admin.AddEnclave(ctx, &api.AddEnclaveRequest{Id: e, Name: fmt.Sprint("e", e)}); err != nil {
			return err
		}
	}
	k := func(v uint32) *uint32 { return &v }
	for _, d := range []*api.AddDeviceRequest{{Name: "srv", Role: "server", Enclave: 2, ServerId: k(20)}, {Name: "srv3", Role: "server", Enclave: 3, ServerId: k(30)},
		{Name: "cli", Role: "client", Enclave: 1}, {Name: "phone", Role: "client", Enclave: 1}, {Name: "gw", Role: "gateway", Enclave: 1}} {
		if _, err := o.admin.AddDevice(ctx, d); err != nil {
			return err
		}
	}
	// The pair after the devices: a device entering an enclave of an
	// allowed pair rotates it (at the end of grace), which would fall in
	// the middle of the faults.
	if _, err := o.admin.AllowPair(ctx, &api.AllowPairRequest{A: 1, B: 2}); err != nil {
		return err
	}
	if _, err := o.admin.AddGrant(ctx, &api.AddGrantRequest{Device: "gw", Pairs: []*api.Pair{{A: 1, B: 2}}}); err != nil {
		return err
	}
	var err error
	for _, c := range []struct {
		id  ca.Identity
		dst **handshake.Credentials
	}{{faultSrv, &f.srvCreds}, {faultCli, &f.cliCreds}, {faultGw, &f.gwCreds}} {
		if *c.dst, err = o.credentials(c.id); err != nil {
			return err
		}
	}
	if err := f.startServer(netip.AddrPort{}); err != nil {
		return err
	}
	srv3, err := o.startAgent(faultSrv3, "ks-org", nil, netip.AddrPort{})
	if err != nil {
		return err
	}
	s.a["srv3"] = srv3
	if err := serveEchoes(srv3); err != nil {
		return err
	}
	if err := f.startRelay(netip.AddrPort{}); err != nil {
		return err
	}
	if err := f.startClient(netip.AddrPort{}); err != nil {
		return err
	}
	f.p = newProbe(netip.AddrPortFrom(faultSrv.Overlay.Addr(), 9000), netip.AddrPortFrom(faultSrv.Overlay.Addr(), 7))
	f.p.use(s.a["cli"])
	if !waitFor(10*time.Second, func() bool { return f.p.echoedSince(time.Now().Add(-time.Second)) > 0 && f.p.tcpOK() }) {
		return errors.New("no echoes through the relay")
	}
	st.fig("datagrams", "50/s, client → relay → server UDP echo")
	st.fig("TCP", "a message every 100 ms on one connection")
	return nil
}

// routes are the client's: both servers.
func (f *faultOrg) routes() []agent.Route {
	return []agent.Route{
		{Prefix: netip.PrefixFrom(faultSrv.Overlay.Addr(), 32), Endpoint: f.srvAddr},
		{Prefix: netip.PrefixFrom(faultSrv3.Overlay.Addr(), 32), Endpoint: f.s.a["srv3"].DataPort()},
	}
}

func (f *faultOrg) startServer(at netip.AddrPort) error {
	a, stop, err := f.s.o.startAgentAt(faultSrv, f.srvCreds, "ks-org", nil, netip.AddrPort{}, at)
	if err != nil {
		return err
	}
	f.s.a["srv"], f.stopSrv, f.srvAddr = a, stop, a.DataPort()
	return serveEchoes(a)
}

func (f *faultOrg) startClient(at netip.AddrPort) error {
	a, stop, err := f.s.o.startAgentAt(faultCli, f.cliCreds, "", f.routes(), f.relay, at)
	if err != nil {
		return err
	}
	f.s.a["cli"], f.stopCli, f.cliAddr = a, stop, a.DataPort()
	return nil
}

func (f *faultOrg) startRelay(at netip.AddrPort) error {
	g, stop, err := f.s.o.startGatewayAt(faultGw, f.gwCreds, false, "", at)
	if err != nil {
		return err
	}
	f.gw, f.stopGw, f.relay = g, stop, g.RelayAddr()
	f.s.gw["gw"] = g
	return nil
}

// serveEchoes runs a TCP echo on port 7 and a UDP echo on port 9000 of a's
// stack.
func serveEchoes(a *agent.Agent) error {
	ln, err := a.Net().ListenTCPAddrPort(netip.AddrPortFrom(a.Addr(), 7))
	if err != nil {
		return err
	}
	go echoTCP(ln)
	pc, err := a.Net().ListenUDPAddrPort(netip.AddrPortFrom(a.Addr(), 9000))
	if err != nil {
		return err
	}
	go echoUDP(pc)
	return nil
}

// window is what the traffic did while a fault ran: from its start to
// the end of the time given to settle.
func (f *faultOrg) window(st *Step, from time.Time, lostGoal bool) error {
	time.Sleep(500 * time.Millisecond) // the last datagrams' echoes
	sent, lost, gap := f.p.since(from)
	st.fig("datagrams sent", sent)
	st.fig("lost", lost)
	st.fig("longest gap", gap.Round(time.Millisecond))
	st.fig("TCP", f.p.tcpSince(from))
	if lostGoal {
		st.fig("goal nothing lost", metOrMissed(lost == 0))
	}
	return nil
}

// recovered waits for the first echo after up and reports the time it
// took against goal.
func (f *faultOrg) recovered(st *Step, up time.Time, goal time.Duration) error {
	var took time.Duration
	if !waitFor(recoverWithin, func() bool {
		t, ok := f.p.firstEchoAfter(up)
		took = t.Sub(up)
		return ok
	}) {
		return fmt.Errorf("no echo within %v of the component being up", recoverWithin)
	}
	st.fig("traffic again after", took.Round(time.Millisecond))
	st.fig(fmt.Sprintf("goal ≤ %v", goal), metOrMissed(took <= goal))
	return nil
}

func metOrMissed(ok bool) string {
	if ok {
		return "met"
	}
	return "MISSED"
}

func (f *faultOrg) keyServiceDown(st *Step) error {
	from := time.Now()
	ks := f.s.o.servers["ks-org"]
	ks.down()
	// A client that starts during the outage gets an SA: the server holds
	// its keys and an SPI lease.
	phone, err := f.s.o.startAgent(faultNew, "", f.routes(), f.relay)
	if err != nil {
		ks.up()
		return err
	}
	f.s.a["phone"] = phone
	t0 := time.Now()
	err = f.exchange("phone", faultSrv, 1000, 5*time.Second)
	newSA := time.Since(t0)
	time.Sleep(max(3*time.Second-time.Since(from), 0))
	if uerr := ks.up(); uerr != nil {
		return uerr
	}
	if err != nil {
		return fmt.Errorf("a new client during the outage: %w", err)
	}
	st.fig("new SA during the outage", newSA.Round(time.Millisecond))
	return f.window(st, from, true)
}

func (f *faultOrg) policyReload(st *Step) error {
	from := time.Now()
	p, err := gateway.ParsePolicy([]byte("deny:\n  - {proto: udp, dst_port: 5353}\n"))
	if err != nil {
		return err
	}
	if err := f.gw.SetPolicy(p); err != nil {
		return err
	}
	time.Sleep(time.Second)
	_ = f.gw.SetPolicy(nil) // nil: nothing to read
	return f.window(st, from, true)
}

func (f *faultOrg) registryChange(st *Step) error {
	from := time.Now()
	ctx, cancel := context.WithTimeout(f.s.ctx, 10*time.Second)
	defer cancel()
	t0 := time.Now()
	if _, err := f.s.o.admin.AllowPair(ctx, &api.AllowPairRequest{A: 1, B: 3}); err != nil {
		return err
	}
	// In effect when the client gets an SA with srv3 and an echo back.
	if !waitFor(recoverWithin, func() bool { return f.exchange("cli", faultSrv3, 100, 250*time.Millisecond) == nil }) {
		return errors.New("pair 1-3 allowed, but the client never reached srv3")
	}
	allowed := time.Since(t0)
	t0 = time.Now()
	if _, err := f.s.o.admin.ForbidPair(ctx, &api.ForbidPairRequest{A: 1, B: 3}); err != nil {
		return err
	}
	if !waitFor(recoverWithin, func() bool { return len(peersOf(f.s.a["srv3"], 1)) == 0 }) {
		return errors.New("pair 1-3 forbidden, but srv3 kept its SA")
	}
	forbidden := time.Since(t0)
	st.fig("allowed: reachable after", allowed.Round(time.Millisecond))
	st.fig("forbidden: SA ended after", forbidden.Round(time.Millisecond))
	st.fig(fmt.Sprintf("goal ≤ %v", goalChange), metOrMissed(allowed <= goalChange && forbidden <= goalChange))
	return f.window(st, from, false)
}

// exchange sends n bytes from client to server's TCP echo and back.
func (f *faultOrg) exchange(client string, server ca.Identity, n int, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(f.s.ctx, timeout)
	defer cancel()
	c, err := f.s.a[client].Net().DialContextTCPAddrPort(ctx, netip.AddrPortFrom(server.Overlay.Addr(), 7))
	if err != nil {
		return fmt.Errorf("%s → %s: %w", client, server.Name, err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(timeout))
	msg := make([]byte, n)
	go c.Write(msg)
	if _, err := io.ReadFull(c, msg); err != nil {
		return fmt.Errorf("%s → %s: %w", client, server.Name, err)
	}
	return nil
}

// peersOf lists the SAs a server holds with enclave j.
func peersOf(a *agent.Agent, j uint16) []agent.Association {
	var out []agent.Association
	for _, as := range a.Associations() {
		if uint16(as.VC.Peer) == j {
			out = append(out, as)
		}
	}
	return out
}

func (f *faultOrg) relayRestart(st *Step) error {
	return f.restart(st, f.stopGw, func() error { return f.startRelay(f.relay) }, goalRelayRestart)
}

func (f *faultOrg) serverRestart(st *Step) error {
	return f.restart(st, f.stopSrv, func() error { return f.startServer(f.srvAddr) }, goalServerRestart)
}

func (f *faultOrg) clientRestart(st *Step) error {
	return f.restart(st, f.stopCli, func() error {
		if err := f.startClient(f.cliAddr); err != nil {
			return err
		}
		f.p.use(f.s.a["cli"]) // the traffic moves to the new client's stack
		return nil
	}, goalClientRestart)
}

// restart stops a component, leaves it away downFor, starts it again on
// its address and measures the time to traffic against goal.
func (f *faultOrg) restart(st *Step, stop func(), start func() error, goal time.Duration) error {
	from := time.Now()
	stop()
	time.Sleep(downFor)
	st.fig("down for", downFor)
	if err := start(); err != nil {
		return err
	}
	if err := f.recovered(st, time.Now(), goal); err != nil {
		return err
	}
	return f.window(st, from, false)
}

// probe is the faults scenario's continuous traffic.
type probe struct {
	udp, tcp netip.AddrPort

	mu     sync.Mutex
	client *agent.Agent
	conn   net.Conn
	seq    uint32
	sentAt map[uint32]time.Time
	echoAt map[uint32]time.Time
	// TCP: when each message's echo came or failed.
	tcpEvents []tcpEvent
	done      chan struct{}
	wg        sync.WaitGroup
}

type tcpEvent struct {
	at time.Time
	ok bool
}

func newProbe(udp, tcp netip.AddrPort) *probe {
	p := &probe{udp: udp, tcp: tcp, sentAt: map[uint32]time.Time{}, echoAt: map[uint32]time.Time{}, done: make(chan struct{})}
	p.wg.Add(2)
	go p.send()
	go p.stream()
	return p
}

// use moves the traffic to client's stack (a restarted client).
func (p *probe) use(client *agent.Agent) {
	c, err := client.Net().DialUDPAddrPort(netip.AddrPort{}, p.udp)
	p.mu.Lock()
	old := p.conn
	p.client = client
	if err == nil {
		p.conn = c
	}
	p.mu.Unlock()
	if old != nil {
		old.Close()
	}
	if err == nil {
		p.wg.Add(1)
		go p.receive(c)
	}
}

func (p *probe) close() {
	close(p.done)
	p.mu.Lock()
	if p.conn != nil {
		p.conn.Close()
	}
	p.mu.Unlock()
	p.wg.Wait()
}

// send sends a numbered datagram every 20 ms on the current connection.
func (p *probe) send() {
	defer p.wg.Done()
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	var buf [8]byte
	for {
		select {
		case <-p.done:
			return
		case <-t.C:
		}
		p.mu.Lock()
		c := p.conn
		if c == nil {
			p.mu.Unlock()
			continue
		}
		p.seq++
		binary.BigEndian.PutUint32(buf[:], p.seq)
		p.sentAt[p.seq] = time.Now()
		p.mu.Unlock()
		c.Write(buf[:])
	}
}

func (p *probe) receive(c net.Conn) {
	defer p.wg.Done()
	buf := make([]byte, 64)
	for {
		n, err := c.Read(buf)
		if err != nil {
			return
		}
		if n < 4 {
			continue
		}
		seq := binary.BigEndian.Uint32(buf)
		p.mu.Lock()
		if _, ok := p.echoAt[seq]; !ok {
			p.echoAt[seq] = time.Now()
		}
		p.mu.Unlock()
	}
}

// stream keeps a TCP connection to the server's echo, a message every
// 100 ms, reconnecting (through the current client) when it breaks.
func (p *probe) stream() {
	defer p.wg.Done()
	var c net.Conn
	defer func() {
		if c != nil {
			c.Close()
		}
	}()
	msg := make([]byte, 64)
	got := make([]byte, 64)
	for {
		select {
		case <-p.done:
			return
		case <-time.After(100 * time.Millisecond):
		}
		p.mu.Lock()
		client := p.client
		p.mu.Unlock()
		if client == nil {
			continue
		}
		ok := false
		if c == nil {
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			if tc, err := client.Net().DialContextTCPAddrPort(ctx, p.tcp); err == nil {
				c = tc
			}
			cancel()
		}
		if c != nil {
			c.SetDeadline(time.Now().Add(2 * time.Second))
			_, err := c.Write(msg)
			if err == nil {
				_, err = io.ReadFull(c, got)
			}
			if ok = err == nil; !ok {
				c.Close()
				c = nil
			}
		}
		p.mu.Lock()
		p.tcpEvents = append(p.tcpEvents, tcpEvent{time.Now(), ok})
		p.mu.Unlock()
	}
}

// since reports the datagrams sent from t on (but for the last 300 ms,
// whose echoes may still come), those lost, and the longest time without
// an echo from t on.
func (p *probe) since(t time.Time) (sent, lost int, gap time.Duration) {
	p.mu.Lock()
	defer p.mu.Unlock()
	cut := time.Now().Add(-300 * time.Millisecond)
	for seq, at := range p.sentAt {
		if at.Before(t) || at.After(cut) {
			continue
		}
		sent++
		if _, ok := p.echoAt[seq]; !ok {
			lost++
		}
	}
	var times []time.Time
	for _, at := range p.echoAt {
		if !at.Before(t) {
			times = append(times, at)
		}
	}
	slices.SortFunc(times, time.Time.Compare)
	prev := t
	for _, at := range times {
		gap = max(gap, at.Sub(prev))
		prev = at
	}
	gap = max(gap, time.Since(prev))
	return sent, lost, gap
}

func (p *probe) echoedSince(t time.Time) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for _, at := range p.echoAt {
		if !at.Before(t) {
			n++
		}
	}
	return n
}

// firstEchoAfter is when the first echo after t came.
func (p *probe) firstEchoAfter(t time.Time) (time.Time, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	var first time.Time
	for _, at := range p.echoAt {
		if at.After(t) && (first.IsZero() || at.Before(first)) {
			first = at
		}
	}
	return first, !first.IsZero()
}

func (p *probe) tcpOK() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.tcpEvents) > 0 && p.tcpEvents[len(p.tcpEvents)-1].ok
}

// tcpSince says what the TCP connection did from t on.
func (p *probe) tcpSince(t time.Time) string {
	p.mu.Lock()
	defer p.mu.Unlock()
	failed, total := 0, 0
	var lastFail time.Time
	for _, e := range p.tcpEvents {
		if e.at.Before(t) {
			continue
		}
		total++
		if !e.ok {
			failed++
			lastFail = e.at
		}
	}
	if failed == 0 {
		return fmt.Sprintf("carried on (%d messages)", total)
	}
	return fmt.Sprintf("%d of %d messages failed, connected again %v after the first", failed, total, lastFail.Sub(t).Round(time.Millisecond))
}
