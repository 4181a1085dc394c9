package lab

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/enclavekeys/enclave/internal/agent"
	"github.com/enclavekeys/enclave/internal/api"
	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/gateway"
	"github.com/enclavekeys/enclave/internal/gather"
	"github.com/enclavekeys/enclave/internal/handshake"
	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/registry"
	"github.com/enclavekeys/enclave/internal/visibility"
)

// The lab's organisation (Fig 1A): four enclaves; pairs 1-1, 1-2, 2-3 and
// 4-4 allowed (web may not reach db: 1-3 is the refused pair); enclave 4
// (ops) is served by a key server holding its own enclave key.
var (
	enclaves = []struct {
		id   uint32
		name string
	}{{1, "web"}, {2, "app"}, {3, "db"}, {4, "ops"}}
	allowed = [][2]uint32{{1, 1}, {1, 2}, {2, 3}, {4, 4}}
)

// scenario is one run's state.
type scenario struct {
	cfg   Config
	o     *org
	rep   *Report
	rng   *rand.Rand
	ctx   context.Context
	start time.Time
	stop  bool // a set-up step failed: the rest cannot run

	a  map[string]*agent.Agent
	gw map[string]*gateway.Gateway
}

// step runs f as the report's next step, timing it and recording its
// outcome; once a set-up step fails, the steps after it are skipped.
func (s *scenario) step(name, what string, setup bool, f func(st *Step) error) {
	st := Step{Name: name, What: what, Figures: []Fig{}}
	n := len(s.rep.Steps) + 1
	if s.cfg.Terminal {
		fmt.Fprintf(s.cfg.Progress, "\r\033[K[%d] %s …", n, name)
	}
	start := time.Now()
	var err error
	switch {
	case s.ctx.Err() != nil:
		err = errors.New("skipped: interrupted")
	case s.stop:
		err = errors.New("skipped: an earlier set-up step failed")
	default:
		err = f(&st)
	}
	st.Seconds = time.Since(start).Seconds()
	st.Passed = err == nil
	if err != nil {
		st.Error = err.Error()
		if setup {
			s.stop = true
		}
	}
	mark := "ok"
	if !st.Passed {
		mark = "FAILED: " + st.Error
	}
	if s.cfg.Terminal {
		fmt.Fprintf(s.cfg.Progress, "\r\033[K")
	}
	fmt.Fprintf(s.cfg.Progress, "[%d] %s: %s (%.1fs)\n", n, name, mark, st.Seconds)
	s.rep.Steps = append(s.rep.Steps, st)
}

func (st *Step) fig(name string, value any) {
	st.Figures = append(st.Figures, Fig{name, fmt.Sprint(value)})
}

func (s *scenario) run() {
	seed := uint64(s.cfg.Seed)
	s.rng = rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	s.a, s.gw = map[string]*agent.Agent{}, map[string]*gateway.Gateway{}
	s.step("CA and enrolment", "a CA, an org key server and two enclave key servers (one with its own enclave key), enclaves, pairs, devices and grants", true, s.enrol)
	s.step("devices up", "servers and clients as netstack agents; relay gateways on the boundaries, a gateway that cannot derive, an org-wide monitor", true, s.devices)
	s.step("enclave discovery", "a client whose certificate names no enclave is placed by a gateway's signed entry", false, s.discovery)
	s.step("SAs and traffic", "TCP between the allowed pairs, one of them under an enclave key of its own", false, s.traffic)
	s.step("a refused pair", "web may not reach db: the server refuses the SA", false, s.refused)
	s.step("least privilege", "a gateway reads the pair it is granted and not the one beside it; the monitor reads what it relays", false, s.leastPrivilege)
	s.step("scheduled rotation under traffic", "the schedule rotates every pair while datagrams flow: the client re-establishes, nothing is lost", false, s.rotation)
	s.step("revocation", "a revoked device's SA ends within seconds", false, s.revocation)
	s.step("direct key exchange", "a gateway that cannot derive gets one SA's keys from its server, after the key service agrees", false, s.directKeyExchange)
	s.step("late join", "a gateway granted a pair while an SA of it runs holds that SA's packets, tells its client, and reads the SA that replaces it", false, s.lateJoin)
	s.step("tampered packet and flood", "a tampered data packet is dropped and counted; a handshake flood leaves the server serving", false, s.hostile)
	s.step("visibility map", "who can read each pair and SA observed, and what a grant would change (a dry run)", false, s.visibilityMap)
	s.step("sub-enclaves", "an org of layout 8.8: an auditor granted the sub-pair 3.2-7 reads it and not its sibling 3.1-7", false, s.subEnclaves)
}

// --- set-up ---

func (s *scenario) enrol(st *Step) error {
	o := s.o
	rot := registry.Rotation{Interval: labInterval, Grace: labGrace}
	if err := o.startOrgTier(s.ctx, "ks-org", rot); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(s.ctx, 20*time.Second)
	defer cancel()
	for _, e := range enclaves {
		if _, err := o.admin.AddEnclave(ctx, &api.AddEnclaveRequest{Id: e.id, Name: e.name}); err != nil {
			return err
		}
	}
	for _, p := range allowed {
		if _, err := o.admin.AllowPair(ctx, &api.AllowPairRequest{A: p[0], B: p[1]}); err != nil {
			return err
		}
	}
	k := func(v uint32) *uint32 { return &v }
	devices := []*api.AddDeviceRequest{
		{Name: "ks-org", Role: "keyserver"}, {Name: "ks-app", Role: "keyserver", Enclave: 2}, {Name: "ks-ops", Role: "keyserver", Enclave: 4},
		{Name: "web1", Role: "server", Enclave: 1, ServerId: k(10)}, {Name: "app1", Role: "server", Enclave: 2, ServerId: k(20)},
		{Name: "db1", Role: "server", Enclave: 3, ServerId: k(30)}, {Name: "ops1", Role: "server", Enclave: 4, ServerId: k(40)},
		{Name: "laptop", Role: "client", Enclave: 1}, {Name: "phone", Role: "client"}, {Name: "analyst", Role: "client", Enclave: 1},
		{Name: "probe", Role: "client", Enclave: 1}, // kiosk joins with a token (devices up)
		{Name: "appcli", Role: "client", Enclave: 2}, {Name: "batch", Role: "client", Enclave: 2}, {Name: "opsdesk", Role: "client", Enclave: 4},
		{Name: "gw-web", Role: "gateway", Enclave: 1}, {Name: "gw-app", Role: "gateway", Enclave: 2},
		{Name: "legacy", Role: "gateway", Enclave: 2}, {Name: "gw-late", Role: "gateway", Enclave: 1}, {Name: "soc", Role: "monitor"},
	}
	for _, d := range devices {
		if _, err := o.admin.AddDevice(ctx, d); err != nil {
			return fmt.Errorf("device %s: %w", d.Name, err)
		}
	}
	grants := []*api.AddGrantRequest{
		{Device: "gw-web", Pairs: []*api.Pair{{A: 1, B: 2}}}, {Device: "gw-app", Pairs: []*api.Pair{{A: 2, B: 3}}},
		{Device: "legacy", Pairs: []*api.Pair{{A: 2, B: 3}}}, {Device: "soc", All: true},
	}
	for _, g := range grants {
		if _, err := o.admin.AddGrant(ctx, g); err != nil {
			return fmt.Errorf("grant %s: %w", g.Device, err)
		}
	}
	if _, err := o.startKeyServer(s.ctx, "ks-app", tierUpstream, 2, rot); err != nil {
		return err
	}
	if _, err := o.startKeyServer(s.ctx, "ks-ops", tierKeyMode, 4, rot); err != nil {
		return err
	}
	st.fig("enclaves", len(enclaves))
	st.fig("pairs allowed", len(allowed))
	// The registered devices, as the visibility map counts them (the
	// admin's certificate is not one: it is no device of the network).
	st.fig("devices", fmt.Sprintf("%d (%d registered by the admin, 1 joins with a token)", len(devices)+1, len(devices)))
	st.fig("key servers", "ks-org (org key), ks-app (enclave 2, pair keys from ks-org), ks-ops (enclave 4, its own enclave key)")
	return nil
}

func ip(s string) netip.Prefix { return netip.MustParsePrefix(s) }

func (s *scenario) devices(st *Step) error {
	o := s.o
	servers := []struct {
		name string
		e    keys.EnclaveID
		k    keys.ServerID
		addr string
		ks   string
	}{{"web1", 1, 10, "100.64.1.10/16", "ks-org"}, {"app1", 2, 20, "100.64.2.20/16", "ks-app"},
		{"db1", 3, 30, "100.64.3.30/16", "ks-org"}, {"ops1", 4, 40, "100.64.4.40/16", "ks-ops"}}
	routes := []agent.Route{}
	for _, sv := range servers {
		a, err := o.startAgent(ca.Identity{Name: sv.name, Role: ca.RoleServer, Enclave: sv.e, ServerID: sv.k, HasServerID: true, Overlay: ip(sv.addr)}, sv.ks, nil, netip.AddrPort{})
		if err != nil {
			return err
		}
		s.a[sv.name] = a
		for _, port := range []uint16{7, 5999} {
			ln, err := a.Net().ListenTCPAddrPort(netip.AddrPortFrom(a.Addr(), port))
			if err != nil {
				return err
			}
			o.onStop(func() { ln.Close() })
			go echoTCP(ln)
		}
		pc, err := a.Net().ListenUDPAddrPort(netip.AddrPortFrom(a.Addr(), 9))
		if err != nil {
			return err
		}
		o.onStop(func() { pc.Close() })
		go echoUDP(pc)
		routes = append(routes, agent.Route{Prefix: netip.PrefixFrom(a.Addr(), 32), Endpoint: a.DataPort()})
	}
	gws := []struct {
		name     string
		role     ca.Role
		e        keys.EnclaveID
		noDerive bool
	}{{"gw-web", ca.RoleGateway, 1, false}, {"gw-app", ca.RoleGateway, 2, false}, {"legacy", ca.RoleGateway, 2, true},
		{"gw-late", ca.RoleGateway, 1, true}, {"soc", ca.RoleMonitor, 0, false}}
	for _, g := range gws {
		gw, err := o.startGateway(ca.Identity{Name: g.name, Role: g.role, Enclave: g.e}, g.noDerive, filepath.Join(o.dir, g.name+"-flows.jsonl"))
		if err != nil {
			return err
		}
		s.gw[g.name] = gw
	}
	clients := []struct {
		name string
		e    keys.EnclaveID
		addr string
		via  string
	}{{"laptop", 1, "100.64.1.101/16", "gw-web"}, {"phone", 0, "100.64.1.102/16", "gw-web"}, {"analyst", 1, "100.64.1.103/16", "soc"},
		{"kiosk", 1, "100.64.1.104/16", "gw-late"}, {"appcli", 2, "100.64.2.101/16", "gw-app"}, {"batch", 2, "100.64.2.102/16", "legacy"},
		{"opsdesk", 4, "100.64.4.101/16", ""}}
	for _, c := range clients {
		var via netip.AddrPort
		if c.via != "" {
			via = s.gw[c.via].RelayAddr()
		}
		id := ca.Identity{Name: c.name, Role: ca.RoleClient, Enclave: c.e, Overlay: ip(c.addr)}
		var a *agent.Agent
		var err error
		if c.name == "kiosk" {
			// kiosk enrolls as a new host does (enclave join): its key is
			// made here and a join token gets it its certificate.
			var creds *handshake.Credentials
			if creds, err = o.join(s.ctx, id); err != nil {
				return err
			}
			st.fig("joined with a token", fmt.Sprintf("%s (certificate of the issuing CA %s)", c.name, creds.Chain[0].Subject.CommonName))
			a, _, err = o.startAgentAt(id, creds, "", routes, via, netip.AddrPort{})
		} else {
			a, err = o.startAgent(id, "", routes, via)
		}
		if err != nil {
			return err
		}
		s.a[c.name] = a
	}
	st.fig("agents", len(s.a))
	st.fig("gateways", "gw-web (1, reads 1-2), gw-app (2, reads 2-3), legacy (cannot derive, 2-3), gw-late (cannot derive, no grant yet), soc (monitor, everything)")
	return nil
}

// --- traffic helpers ---

func echoTCP(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func() { io.Copy(c, c); c.Close() }()
	}
}

func echoUDP(pc net.PacketConn) {
	buf := make([]byte, 2048)
	for {
		n, from, err := pc.ReadFrom(buf)
		if err != nil {
			return
		}
		pc.WriteTo(buf[:n], from)
	}
}

// server overlay addresses.
var overlay = map[string]netip.Addr{
	"web1": netip.MustParseAddr("100.64.1.10"), "app1": netip.MustParseAddr("100.64.2.20"),
	"db1": netip.MustParseAddr("100.64.3.30"), "ops1": netip.MustParseAddr("100.64.4.40"),
}

// exchange sends n bytes from client to server's echo port and back.
func (s *scenario) exchange(client, server string, port uint16, n int, timeout time.Duration) error {
	msg := make([]byte, n)
	for i := range msg {
		msg[i] = byte(s.rng.IntN(256))
	}
	if err := echoTo(s.ctx, s.a[client], netip.AddrPortFrom(overlay[server], port), msg, timeout); err != nil {
		return fmt.Errorf("%s → %s: %w", client, server, err)
	}
	return nil
}

// echoTo sends msg from a client agent to an echo port and wants it back.
func echoTo(ctx context.Context, a *agent.Agent, to netip.AddrPort, msg []byte, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	c, err := a.Net().DialContextTCPAddrPort(ctx, to)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(timeout))
	go c.Write(msg)
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil {
		return err
	}
	if !bytes.Equal(got, msg) {
		return errors.New("the echo differs")
	}
	return nil
}

// counter sums a metric over the series whose labels include labels (-1
// if the registry cannot be read).
func counter(g prometheus.Gatherer, name string, labels map[string]string) float64 {
	v, err := gather.Sum(g, name, labels)
	if err != nil {
		return -1
	}
	return v
}

func (s *scenario) gwCount(gw, pair, outcome string) float64 {
	return counter(s.gw[gw].Metrics().Registry(), "enclave_gateway_pair_packets_total", map[string]string{"pair": pair, "outcome": outcome})
}

// gwData counts a gateway's data packets of one outcome.
func (s *scenario) gwData(gw, outcome string) float64 {
	return counter(s.gw[gw].Metrics().Registry(), "enclave_gateway_packets_total", map[string]string{"kind": "data", "outcome": outcome})
}

func (s *scenario) agentCount(a, name string, labels map[string]string) float64 {
	return counter(s.a[a].Metrics().Gatherer(), name, labels)
}

// waitFor polls cond until it holds or d passes.
func waitFor(d time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(20 * time.Millisecond)
	}
	return true
}

// peerEnclave is the enclave a server's SA with peer names (0: none).
func (s *scenario) peerEnclave(server, peer string) keys.EnclaveID {
	for _, as := range s.a[server].Associations() {
		if as.Server && as.Peer == peer {
			return as.VC.Peer
		}
	}
	return 0
}

// --- the steps ---

func (s *scenario) discovery(st *Step) error {
	start := time.Now()
	if err := s.exchange("phone", "app1", 7, 1000, 10*time.Second); err != nil {
		return err
	}
	e := s.peerEnclave("app1", "phone")
	st.fig("phone's certificate names", "no enclave")
	st.fig("app1 placed it in enclave", e)
	st.fig("first exchange", time.Since(start).Round(time.Millisecond))
	if e != 1 {
		return fmt.Errorf("app1 placed phone in enclave %d, want 1 (gw-web's)", e)
	}
	return nil
}

func (s *scenario) traffic(st *Step) error {
	for _, p := range [][2]string{{"laptop", "app1"}, {"appcli", "db1"}, {"opsdesk", "ops1"}, {"analyst", "app1"}} {
		if err := s.exchange(p[0], p[1], 7, 64<<10, 10*time.Second); err != nil {
			return err
		}
	}
	var rtts []time.Duration
	for range 20 {
		t := time.Now()
		if err := s.exchange("laptop", "app1", 7, 64, 5*time.Second); err != nil {
			return err
		}
		rtts = append(rtts, time.Since(t))
	}
	slices.Sort(rtts)
	sas := 0
	for _, n := range []string{"web1", "app1", "db1", "ops1"} {
		sas += s.a[n].SAs()
	}
	st.fig("SAs up", sas)
	st.fig("bytes echoed", 4*64<<10)
	st.fig("TCP connect+echo p50", rtts[len(rtts)/2].Round(10*time.Microsecond))
	st.fig("pair 4-4", "keys from ks-ops's own enclave key")
	return nil
}

func (s *scenario) refused(st *Step) error {
	err := s.exchange("laptop", "db1", 7, 100, 1500*time.Millisecond)
	n := s.agentCount("db1", "enclave_agent_handshakes_total", map[string]string{"side": "responder", "result": "refused", "reason": "policy"})
	st.fig("db1's refusals (policy)", n)
	if err == nil {
		return errors.New("laptop reached db1 across the forbidden pair 1-3")
	}
	if n == 0 {
		return errors.New("db1 counted no refusal")
	}
	return nil
}

func (s *scenario) leastPrivilege(st *Step) error {
	if err := s.exchange("laptop", "web1", 7, 16<<10, 10*time.Second); err != nil {
		return err
	}
	read12, opaque11, read11 := s.gwCount("gw-web", "1-2", "read"), s.gwCount("gw-web", "1-1", "opaque"), s.gwCount("gw-web", "1-1", "read")
	socRead := s.gwCount("soc", "1-2", "read")
	st.fig("gw-web read 1-2", read12)
	st.fig("gw-web opaque 1-1", opaque11)
	st.fig("gw-web read 1-1", read11)
	st.fig("soc read 1-2", socRead)
	if read12 == 0 || opaque11 == 0 || read11 != 0 || socRead == 0 {
		return errors.New("a gateway read what it was not granted, or not what it was")
	}
	return nil
}

// labGrace is the key service's grace in the lab: how long a previous
// generation stays accepted, and the least time between two rotations.
const labGrace = 2 * time.Second

// labInterval is the lab's rotation schedule.
const labInterval = time.Hour

// quiet waits until pair 1-2 has no rotation pending and its last one is
// a grace ago, so that the rotation the step asks for happens at once,
// alone (enrolment's device events rotate pairs too).
func (s *scenario) quiet(ctx context.Context) error {
	for {
		st, err := s.o.admin.Status(ctx, &api.StatusRequest{})
		if err != nil {
			return err
		}
		for _, p := range st.GetPairs() {
			if p.GetPair().GetA() == 1 && p.GetPair().GetB() == 2 && p.GetPendingAt() == nil &&
				time.Since(p.GetRotatedAt().AsTime()) > labGrace+200*time.Millisecond {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func (s *scenario) rotation(st *Step) error {
	ctx, cancel := context.WithTimeout(s.ctx, 15*time.Second)
	defer cancel()
	if err := s.quiet(ctx); err != nil {
		return err
	}
	c, err := s.a["laptop"].Net().DialUDPAddrPort(netip.AddrPort{}, netip.AddrPortFrom(overlay["app1"], 9))
	if err != nil {
		return err
	}
	defer c.Close()
	before := s.gen("laptop", "app1")
	gensBefore, err := s.generations(ctx)
	if err != nil {
		return err
	}
	const total = 200
	got := make(chan int, total)
	go func() {
		buf := make([]byte, 64)
		for {
			c.SetReadDeadline(time.Now().Add(3 * time.Second))
			n, err := c.Read(buf)
			if err != nil {
				close(got)
				return
			}
			if n >= 4 {
				got <- int(buf[0])<<24 | int(buf[1])<<16 | int(buf[2])<<8 | int(buf[3])
			}
		}
	}()
	for i := range total {
		if i == total/4 {
			// The schedule comes due: the key services' clock moves on
			// by the rotation interval, and every pair rotates.
			s.o.clock.Advance(labInterval)
		}
		msg := []byte{byte(i >> 24), byte(i >> 16), byte(i >> 8), byte(i), 'e', 'n', 'c'}
		c.Write(msg)
		time.Sleep(10 * time.Millisecond)
	}
	seen := map[int]bool{}
	for v := range got {
		seen[v] = true
		if len(seen) == total {
			break
		}
	}
	// The server spreads its rekey notices over half the time the old
	// generation has left: the client's may come after the stream.
	waitFor(2*labGrace, func() bool { return s.gen("laptop", "app1") > before })
	after := s.gen("laptop", "app1")
	gensAfter, err := s.generations(ctx)
	if err != nil {
		return err
	}
	moved := 0
	for p, g := range gensAfter {
		if g > gensBefore[p] {
			moved++
		}
	}
	st.fig("rotation", "scheduled (the key services' clock moved on by the interval)")
	st.fig("pairs rotated", fmt.Sprintf("%d of %d", moved, len(gensAfter)))
	st.fig("generation", fmt.Sprintf("%d → %d", before, after))
	st.fig("datagrams", total)
	st.fig("lost", total-len(seen))
	st.fig("gw-web opaque 1-2", s.gwCount("gw-web", "1-2", "opaque"))
	if after != before+1 {
		return fmt.Errorf("one rotation should move the client from generation %d to %d; it is at %d", before, before+1, after)
	}
	if len(seen) != total {
		return fmt.Errorf("%d of %d datagrams lost across the rotation", total-len(seen), total)
	}
	return nil
}

// generations reads every allowed pair's current generation.
func (s *scenario) generations(ctx context.Context) (map[string]uint32, error) {
	st, err := s.o.admin.Status(ctx, &api.StatusRequest{})
	if err != nil {
		return nil, err
	}
	out := map[string]uint32{}
	for _, p := range st.GetPairs() {
		out[fmt.Sprintf("%d-%d", p.GetPair().GetA(), p.GetPair().GetB())] = p.GetGeneration()
	}
	return out, nil
}

// gen is the newest generation of client's SAs with server.
func (s *scenario) gen(client, server string) keys.Generation {
	var g keys.Generation
	for _, as := range s.a[client].Associations() {
		if as.Peer == server && as.Generation > g {
			g = as.Generation
		}
	}
	return g
}

func (s *scenario) revocation(st *Step) error {
	if err := s.exchange("phone", "app1", 7, 100, 10*time.Second); err != nil {
		return err
	}
	start := time.Now()
	ctx, cancel := context.WithTimeout(s.ctx, 10*time.Second)
	defer cancel()
	if _, err := s.o.admin.RevokeDevice(ctx, &api.RevokeDeviceRequest{Name: "phone"}); err != nil {
		return err
	}
	ended := waitFor(5*time.Second, func() bool { return s.peerEnclave("app1", "phone") == 0 })
	st.fig("SA ended after", time.Since(start).Round(time.Millisecond))
	if !ended {
		return errors.New("app1 still holds an SA with the revoked phone")
	}
	if err := s.exchange("phone", "app1", 7, 100, 2*time.Second); err == nil {
		return errors.New("the revoked phone still reached app1")
	}
	st.fig("phone afterwards", "refused")
	return nil
}

func (s *scenario) directKeyExchange(st *Step) error {
	if err := s.exchange("batch", "db1", 7, 8<<10, 10*time.Second); err != nil {
		return err
	}
	reg := s.gw["legacy"].Metrics().Registry()
	ok := waitFor(5*time.Second, func() bool {
		return counter(reg, "enclave_gateway_key_exchange_total", map[string]string{"outcome": "delivered"}) >= 1
	})
	if err := s.exchange("batch", "db1", 7, 8<<10, 10*time.Second); err != nil {
		return err
	}
	st.fig("keys delivered to legacy", counter(reg, "enclave_gateway_key_exchange_total", map[string]string{"outcome": "delivered"}))
	st.fig("legacy read 2-3", s.gwCount("legacy", "2-3", "read"))
	st.fig("pair keys legacy holds", counter(reg, "enclave_gateway_pair_keys", nil))
	if !ok || s.gwCount("legacy", "2-3", "read") == 0 {
		return errors.New("the gateway that cannot derive did not read the SA")
	}
	return nil
}

func (s *scenario) lateJoin(st *Step) error {
	ctx, cancel := context.WithTimeout(s.ctx, 20*time.Second)
	defer cancel()
	c, err := s.a["kiosk"].Net().DialContextTCPAddrPort(ctx, netip.AddrPortFrom(overlay["app1"], 7))
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(20 * time.Second))
	echoes := 0
	ping := func() error {
		msg := []byte("kiosk still here")
		if _, err := c.Write(msg); err != nil {
			return err
		}
		if _, err := io.ReadFull(c, make([]byte, len(msg))); err != nil {
			return err
		}
		echoes++
		return nil
	}
	if err := ping(); err != nil {
		return err
	}
	opaque := s.gwCount("gw-late", "1-2", "opaque")
	if _, err := s.o.admin.AddGrant(ctx, &api.AddGrantRequest{Device: "gw-late", Pairs: []*api.Pair{{A: 1, B: 2}}}); err != nil {
		return err
	}
	if err := s.gw["gw-late"].Refresh(ctx); err != nil {
		return err
	}
	start := time.Now()
	unread := s.gwCount("gw-late", "1-2", "opaque")
	var perr error
	joined := waitFor(10*time.Second, func() bool {
		if perr = ping(); perr != nil {
			return true
		}
		return s.gwCount("gw-late", "1-2", "read") > 0
	})
	if perr != nil {
		return fmt.Errorf("the connection broke: %w", perr)
	}
	st.fig("opaque before the grant", opaque)
	st.fig("joined after", time.Since(start).Round(time.Millisecond))
	st.fig("echoes on one TCP connection", echoes)
	st.fig("held unread after the grant", s.gwData("gw-late", "held"))
	st.fig("clients told", s.gwData("gw-late", "nudged"))
	if n := s.gwCount("gw-late", "1-2", "opaque"); n != unread {
		return fmt.Errorf("%v packets of pair 1-2 passed gw-late unread after its grant", n-unread)
	}
	if !joined {
		return errors.New("gw-late never read the SA")
	}
	return nil
}

func (s *scenario) hostile(st *Step) error {
	// A tampered packet: laptop's current SA to app1, one of its data
	// packets sealed again by the org's monitor key (as only a key
	// holder could), with one ciphertext byte flipped.
	pkt, err := s.forge()
	if err != nil {
		return err
	}
	conn, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(s.a["app1"].DataPort()))
	if err != nil {
		return err
	}
	defer conn.Close()
	auth := func() float64 {
		return s.agentCount("app1", "enclave_agent_drops_total", map[string]string{"cause": "auth"})
	}
	before := auth()
	pkt[len(pkt)-20] ^= 0x40
	conn.Write(pkt)
	dropped := waitFor(3*time.Second, func() bool { return auth() > before })
	st.fig("tampered packet", map[bool]string{true: "dropped, counted as auth", false: "not counted"}[dropped])
	if !dropped {
		return errors.New("app1 did not count the tampered packet")
	}
	// A flood of initiations from one source, then a new client's
	// handshake.
	ctrl, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(netip.AddrPortFrom(s.a["app1"].DataPort().Addr(), s.a["app1"].DataPort().Port()+1)))
	if err != nil {
		return err
	}
	defer ctrl.Close()
	junk := make([]byte, 200)
	junk[0], junk[1], junk[2], junk[7] = 0x45, 1, 1, 1
	const flood = 5000
	for range flood {
		ctrl.Write(junk)
	}
	probe, err := s.o.startAgent(ca.Identity{Name: "probe", Role: ca.RoleClient, Enclave: 1, Overlay: ip("100.64.1.199/16")}, "",
		[]agent.Route{{Prefix: netip.PrefixFrom(overlay["app1"], 32), Endpoint: s.a["app1"].DataPort()}}, netip.AddrPort{})
	if err != nil {
		return err
	}
	s.a["probe"] = probe
	start := time.Now()
	if err := s.exchange("probe", "app1", 7, 100, 10*time.Second); err != nil {
		return fmt.Errorf("after the flood: %w", err)
	}
	st.fig("flood", fmt.Sprintf("%d initiations", flood))
	st.fig("app1 dropped", s.agentCount("app1", "enclave_agent_handshakes_total", map[string]string{"side": "responder", "result": "dropped"}))
	st.fig("a new client's exchange after it", time.Since(start).Round(time.Millisecond))
	return nil
}

// forge seals a packet on laptop's SA to app1 with the pair key the
// monitor holds (what a holder of EK(1,2) can do, and nobody else).
func (s *scenario) forge() ([]byte, error) {
	var as *agent.Association
	for _, x := range s.a["laptop"].Associations() {
		if x.Peer == "app1" && (as == nil || x.Generation > as.Generation) {
			x := x
			as = &x
		}
	}
	if as == nil {
		return nil, errors.New("laptop has no SA with app1")
	}
	conn, err := s.o.dial("ks-org", ca.Identity{Name: "soc", Role: ca.RoleMonitor})
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(s.ctx, 5*time.Second)
	defer cancel()
	resp, err := api.NewKeyServiceClient(conn).GetPairKeys(ctx, &api.GetPairKeysRequest{Pairs: []*api.Pair{{A: 1, B: 2}}})
	if err != nil {
		return nil, err
	}
	for _, k := range resp.GetKeys() {
		if keys.Generation(k.GetValidity().GetGeneration()) != as.Generation {
			continue
		}
		return sealWith(k.GetKey(), as)
	}
	return nil, fmt.Errorf("no pair key of generation %d", as.Generation)
}

func (s *scenario) visibilityMap(st *Step) error {
	ctx, cancel := context.WithTimeout(s.ctx, 10*time.Second)
	defer cancel()
	status, err := s.o.admin.Status(ctx, &api.StatusRequest{})
	if err != nil {
		return err
	}
	delivered := map[[2]uint64][]string{} // (VC, SPI) -> gateways given its keys
	for name, g := range s.gw {
		for _, d := range g.Delivered() {
			k := [2]uint64{uint64(d.VC.Enclave)<<48 | uint64(d.VC.Peer)<<32 | uint64(d.VC.Server), uint64(d.SPI)}
			delivered[k] = append(delivered[k], name)
		}
	}
	var observed []visibility.Observed
	for _, a := range s.a {
		for _, as := range a.Associations() {
			if as.Server {
				k := [2]uint64{uint64(as.VC.Enclave)<<48 | uint64(as.VC.Peer)<<32 | uint64(as.VC.Server), uint64(as.RecvSPI)}
				observed = append(observed, visibility.Observed{Enclave: uint32(as.VC.Enclave), Peer: uint32(as.VC.Peer),
					Server: uint32(as.VC.Server), SPI: uint32(as.RecvSPI), Client: as.Peer, Delivered: delivered[k]})
			}
		}
	}
	slices.SortFunc(observed, func(a, b visibility.Observed) int { return strings.Compare(fmt.Sprint(a), fmt.Sprint(b)) })
	m := visibility.Build(s.o.auth.Org, status, observed, visibility.Options{EnclaveKeyMode: []uint32{4}, NoDerive: []string{"legacy", "gw-late"}})
	s.rep.Map = m
	st.fig("devices", len(m.Devices))
	if len(m.Devices) != len(status.GetDevices()) {
		return fmt.Errorf("the map shows %d devices, the registry holds %d", len(m.Devices), len(status.GetDevices()))
	}
	st.fig("pairs", len(m.Pairs))
	st.fig("SAs observed", len(m.SAs))
	st.fig("readers of 1-2", len(m.Readers(1, 2)))
	n := 0
	for _, sa := range m.SAs {
		for _, r := range sa.Readers {
			if r.Right == visibility.RightExchange {
				n++
			}
		}
	}
	st.fig("SAs read by direct key exchange", n)
	if n == 0 {
		return errors.New("no SA shows the keys direct key exchange delivered")
	}
	return s.dryRun(ctx, st, status)
}

// dryRun asks the key service what granting gw-web pair 2-3 would do
// (enclave admin grant add --dry-run): gw-web gains sight of 2-3 and
// nothing is committed.
func (s *scenario) dryRun(ctx context.Context, st *Step, before *api.StatusReply) error {
	req := &api.PreviewRequest{Change: &api.PreviewRequest_AddGrant{AddGrant: &api.AddGrantRequest{Device: "gw-web", Pairs: []*api.Pair{{A: 2, B: 3}}}}}
	pv, err := s.o.admin.Preview(ctx, req)
	if err != nil {
		return fmt.Errorf("dry run: %w", err)
	}
	d := visibility.CompareStatus(pv.GetBefore(), pv.GetAfter())
	var text strings.Builder
	if err := d.Text(&text); err != nil {
		return err
	}
	st.fig("dry run: grant gw-web pair 2-3", strings.TrimSpace(text.String()))
	if !slices.ContainsFunc(d.Gained, func(a visibility.Access) bool { return a.Device == "gw-web" && a.Pair == "2-3" }) {
		return fmt.Errorf("the dry run does not give gw-web sight of 2-3: %s", text.String())
	}
	after, err := s.o.admin.Status(ctx, &api.StatusRequest{})
	if err != nil {
		return err
	}
	if c := visibility.CompareStatus(before, after); !c.Empty() {
		return errors.New("the dry run changed the registry")
	}
	return nil
}
