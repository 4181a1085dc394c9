package lab

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/keys"
)

// The lab in network namespaces (--netns, root): the same organisation as
// real processes of this binary. A router namespace holds the key server
// and two inline gateways on netfilter queues (gw-web on the traffic of
// enclave 1, gw-app on that of enclave 3); each host is a namespace of its
// own with an agent on a TUN device, linked to the router by a veth pair.
// Host n of enclave e has 10.9e.n.2/24 (the router 10.9e.n.1) and overlay
// address 100.64.e.n. Everything is removed at the end, also when the run
// is interrupted.

// netHost is one host of the namespaced lab.
type netHost struct {
	name    string
	role    ca.Role
	enclave keys.EnclaveID
	n       int
	server  keys.ServerID
}

func (h netHost) underlay() string { return fmt.Sprintf("10.9%d.%d.2", h.enclave, h.n) }
func (h netHost) router() string   { return fmt.Sprintf("10.9%d.%d.1", h.enclave, h.n) }
func (h netHost) overlay() string  { return fmt.Sprintf("100.64.%d.%d", h.enclave, h.n) }

var netHosts = []netHost{
	{"web1", ca.RoleServer, 1, 1, 10}, {"laptop", ca.RoleClient, 1, 2, 0},
	{"app1", ca.RoleServer, 2, 1, 20}, {"appcli", ca.RoleClient, 2, 2, 0},
	{"db1", ca.RoleServer, 3, 1, 30},
	{"ops1", ca.RoleServer, 4, 1, 40}, {"opsdesk", ca.RoleClient, 4, 2, 0},
}

// netLab is a namespaced run's state.
type netLab struct {
	s      *scenario
	bin    string
	prefix string
	ipt    string
	router string
	ns     map[string]string // host name -> namespace

	mu    sync.Mutex
	procs map[string]*exec.Cmd
	logs  map[string]*syncBuffer
	argv  map[string][2][]string // what spawn ran: namespace and command (for a restart)
}

// ErrNetns: the namespaced lab cannot run here.
var ErrNetns = errors.New("lab --netns")

// RunNetns runs the namespaced lab. It needs root, ip, iptables, ping and
// iperf3.
func RunNetns(ctx context.Context, cfg Config) (*Report, error) {
	if os.Geteuid() != 0 {
		return nil, fmt.Errorf("%w needs root (network namespaces, TUN devices, netfilter queues)", ErrNetns)
	}
	l := &netLab{prefix: fmt.Sprintf("enl%d", os.Getpid()%100000), ns: map[string]string{}, procs: map[string]*exec.Cmd{}, logs: map[string]*syncBuffer{},
		argv: map[string][2][]string{}}
	for _, tool := range []string{"ip", "ping", "iperf3"} {
		if _, err := exec.LookPath(tool); err != nil {
			return nil, fmt.Errorf("%w needs %s (apt-get install iproute2 iputils-ping iperf3)", ErrNetns, tool)
		}
	}
	for _, t := range []string{"iptables-legacy", "iptables"} {
		if p, err := exec.LookPath(t); err == nil {
			l.ipt = p
			break
		}
	}
	if l.ipt == "" {
		return nil, fmt.Errorf("%w needs iptables (apt-get install iptables)", ErrNetns)
	}
	bin, err := os.Executable()
	if err != nil {
		return nil, err
	}
	l.bin = bin
	if cfg.Progress == nil {
		cfg.Progress = os.Stderr
	}
	s, end, err := begin(ctx, cfg, "enclave-lab-netns-")
	if err != nil {
		return nil, err
	}
	defer end()
	l.s = s
	defer l.teardown()
	s.step("namespaces and links", "a router and seven hosts, each host linked to the router", true, l.topology)
	s.step("key server and enrolment", "the key server in the router's namespace; enclaves, pairs, devices and grants through `enclave admin`", true, l.keyServer)
	s.step("inline gateways", "gw-web on enclave 1's traffic and gw-app on enclave 3's, on netfilter queues of the router", true, l.gateways)
	s.step("agents on TUN devices", "a server or client agent in each host", true, l.agents)
	s.step("ping across the allowed pairs", "1-2, 1-1, 2-3 and 4-4, through the router and its gateways", false, l.pings)
	s.step("a refused pair", "web may not reach db", false, l.refused)
	s.step("least privilege inline", "gw-web reads 1-2 and not 1-1; gw-app reads 2-3", false, l.leastPrivilege)
	s.step("iperf3 through a gateway", "TCP from laptop to app1, read by gw-web on the way", false, l.iperf)
	s.step("rotation under ping", "pair 1-2 rotates while laptop pings app1 every 20 ms", false, l.rotation)
	if cfg.Faults {
		s.step("server agent killed", "app1's agent is killed with SIGKILL and started again while laptop pings it (goal: traffic within 3 s of it being up)", false, l.killServer)
		s.step("inline gateway restart", "gw-web is killed with SIGKILL and started again (goal: traffic within 1 s of it being up)", false, l.restartGateway)
	}
	return s.finish(), nil
}

// run runs a command and returns its output, or an error with it.
func (l *netLab) run(args ...string) (string, error) {
	cmd := exec.CommandContext(l.s.ctx, args[0], args[1:]...)
	cmd.Dir = l.s.o.dir
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}

// in runs a command in a namespace.
func (l *netLab) in(ns string, args ...string) (string, error) {
	return l.run(append([]string{"ip", "netns", "exec", ns}, args...)...)
}

// spawn starts a long-running command in a namespace; its output is kept
// (and written to DIR/logs with --keep).
func (l *netLab) spawn(name, ns string, args ...string) error {
	cmd := exec.Command("ip", append([]string{"netns", "exec", ns}, args...)...)
	cmd.Dir = l.s.o.dir
	buf := &syncBuffer{}
	cmd.Stdout, cmd.Stderr = buf, buf
	if err := cmd.Start(); err != nil {
		return err
	}
	l.mu.Lock()
	l.procs[name], l.logs[name] = cmd, buf
	l.argv[name] = [2][]string{{ns}, args}
	l.mu.Unlock()
	return nil
}

// kill9 kills a spawned process with SIGKILL and waits for it.
func (l *netLab) kill9(name string) {
	l.mu.Lock()
	p := l.procs[name]
	delete(l.procs, name)
	l.mu.Unlock()
	if p != nil {
		p.Process.Kill()
		p.Wait()
	}
}

// respawn starts a killed process again as it was first started; its new
// log follows the old one.
func (l *netLab) respawn(name string) error {
	l.mu.Lock()
	argv := l.argv[name]
	old := l.logs[name]
	l.mu.Unlock()
	if err := l.spawn(name, argv[0][0], argv[1]...); err != nil {
		return err
	}
	l.mu.Lock()
	l.logs[name].Write([]byte(old.String() + "--- restarted ---\n"))
	l.mu.Unlock()
	return nil
}

// pingUntil pings to from host once at a time (waiting 200 ms for each
// reply) until a reply comes, and
// returns how long that took (or an error after within).
func (l *netLab) pingUntil(from, to string, within time.Duration) (time.Duration, error) {
	start := time.Now()
	for time.Since(start) < within {
		if out, _ := l.in(l.ns[from], "ping", "-c", "1", "-W", "0.2", "-q", to); strings.Contains(out, " 1 received") {
			return time.Since(start), nil
		}
	}
	return 0, fmt.Errorf("no ping reply from %s to %s within %v", from, to, within)
}

// restartTimed kills name with SIGKILL, leaves it away a moment, starts it
// again, waits for its ready line and measures the time to a ping from
// laptop to app1 against goal.
func (l *netLab) restartTimed(st *Step, name, ready string, goal time.Duration) error {
	if _, err := l.pingUntil("laptop", "100.64.2.1", 10*time.Second); err != nil {
		return fmt.Errorf("before: %w", err)
	}
	l.kill9(name)
	time.Sleep(300 * time.Millisecond)
	if err := l.respawn(name); err != nil {
		return err
	}
	if err := l.waitLog(name, ready+`(?s:.*)`+ready); err != nil { // the new instance's line, after the old one's
		return err
	}
	took, err := l.pingUntil("laptop", "100.64.2.1", recoverWithin)
	if err != nil {
		return err
	}
	st.fig("ping again after", took.Round(time.Millisecond))
	st.fig(fmt.Sprintf("goal ≤ %v", goal), metOrMissed(took <= goal))
	return nil
}

func (l *netLab) killServer(st *Step) error {
	return l.restartTimed(st, "app1", `agent listening`, goalServerRestart)
}

func (l *netLab) restartGateway(st *Step) error {
	return l.restartTimed(st, "gw-web", `gateway up`, goalRelayRestart)
}

// waitLog waits for a line matching re from a spawned command.
func (l *netLab) waitLog(name, re string) error {
	r := regexp.MustCompile(re)
	if waitFor(15*time.Second, func() bool { return r.MatchString(l.logs[name].String()) }) {
		return nil
	}
	return fmt.Errorf("%s did not log %q:\n%s", name, re, tail(l.logs[name].String(), 1500))
}

// teardown stops every process and removes every namespace (with its
// links, TUN devices and rules).
func (l *netLab) teardown() {
	l.mu.Lock()
	procs := l.procs
	l.procs = map[string]*exec.Cmd{}
	l.mu.Unlock()
	for _, p := range procs {
		p.Process.Signal(os.Interrupt)
	}
	for _, p := range procs {
		waitOrKill(p, 5*time.Second)
	}
	if l.s != nil && l.s.rep.Dir != "" {
		os.MkdirAll(filepath.Join(l.s.rep.Dir, "logs"), 0o700)
		for name, b := range l.logs {
			os.WriteFile(filepath.Join(l.s.rep.Dir, "logs", name+".log"), []byte(b.String()), 0o600)
		}
	}
	for _, ns := range append([]string{l.router}, mapValues(l.ns)...) {
		if ns != "" {
			exec.Command("ip", "netns", "del", ns).Run()
		}
	}
}

func mapValues(m map[string]string) []string {
	var out []string
	for _, v := range m {
		out = append(out, v)
	}
	return out
}

func (l *netLab) topology(st *Step) error {
	l.router = l.prefix + "r"
	if _, err := l.run("ip", "netns", "add", l.router); err != nil {
		return err
	}
	if _, err := l.run("ip", "-n", l.router, "link", "set", "lo", "up"); err != nil {
		return err
	}
	if _, err := l.in(l.router, "sysctl", "-qw", "net.ipv4.ip_forward=1"); err != nil {
		return err
	}
	for i, h := range netHosts {
		ns := fmt.Sprintf("%s%d", l.prefix, i)
		l.ns[h.name] = ns
		a, b := fmt.Sprintf("eh%d", i), fmt.Sprintf("er%d", i)
		for _, c := range [][]string{
			{"ip", "netns", "add", ns}, {"ip", "-n", ns, "link", "set", "lo", "up"},
			{"ip", "link", "add", a, "netns", ns, "type", "veth", "peer", "name", b, "netns", l.router},
			{"ip", "-n", ns, "addr", "add", h.underlay() + "/24", "dev", a}, {"ip", "-n", ns, "link", "set", a, "up"},
			{"ip", "-n", l.router, "addr", "add", h.router() + "/24", "dev", b}, {"ip", "-n", l.router, "link", "set", b, "up"},
			{"ip", "-n", ns, "route", "add", "default", "via", h.router()},
		} {
			if _, err := l.run(c...); err != nil {
				return err
			}
		}
	}
	st.fig("namespaces", len(netHosts)+1)
	st.fig("hosts", len(netHosts))
	return nil
}

// keyServerAddr is where hosts reach the key server (the router's address
// on each host's link serves; the certificate names them all).
func (l *netLab) keyServerAddr(h netHost) string { return h.router() + ":7443" }

func (l *netLab) keyServer(st *Step) error {
	o := l.s.o
	var hosts []string
	for _, h := range netHosts {
		hosts = append(hosts, h.router())
	}
	hosts = append(hosts, "127.0.0.1")
	if _, err := o.issue(ca.Identity{Name: "ks", Role: ca.RoleKeyserver}, hosts...); err != nil {
		return err
	}
	if _, err := o.issue(ca.Identity{Name: "alice", Role: ca.RoleAdmin}); err != nil {
		return err
	}
	if _, err := l.run(l.bin, "keys", "generate", "--out", "kek"); err != nil {
		return err
	}
	if err := l.spawn("keyserver", l.router, l.bin, "keyserver", "--ca", "ca/ca.crt", "--cert", "certs/ks.crt", "--key", "certs/ks.key",
		"--store", "ks.db", "--audit", "audit.log", "--kek-file", "kek", "--listen", "0.0.0.0:7443", "--metrics-listen", "", "--grace", "5s"); err != nil {
		return err
	}
	if err := l.waitLog("keyserver", `key service listening`); err != nil {
		return err
	}
	admin := []string{l.bin, "admin", "--keyserver", "127.0.0.1:7443", "--ca", "ca/ca.crt", "--cert", "certs/alice.crt", "--key", "certs/alice.key"}
	cmds := [][]string{}
	for _, e := range enclaves {
		cmds = append(cmds, []string{"enclave", "add", "--id", strconv.Itoa(int(e.id)), "--name", e.name})
	}
	for _, p := range allowed {
		cmds = append(cmds, []string{"pair", "allow", fmt.Sprintf("%d-%d", p[0], p[1])})
	}
	for _, h := range netHosts {
		c := []string{"device", "add", "--name", h.name, "--role", string(h.role), "--enclave", strconv.Itoa(int(h.enclave))}
		if h.role == ca.RoleServer {
			c = append(c, "--server-id", strconv.Itoa(int(h.server)))
		}
		cmds = append(cmds, c)
	}
	cmds = append(cmds, []string{"device", "add", "--name", "gw-web", "--role", "gateway", "--enclave", "1"},
		[]string{"device", "add", "--name", "gw-app", "--role", "gateway", "--enclave", "2"},
		[]string{"grant", "add", "--device", "gw-web", "--pairs", "1-2"}, []string{"grant", "add", "--device", "gw-app", "--pairs", "2-3"})
	for _, c := range cmds {
		if _, err := l.in(l.router, append(admin, c...)...); err != nil {
			return err
		}
	}
	st.fig("key server", "enclave keyserver, in the router's namespace")
	st.fig("admin commands", len(cmds))
	return nil
}

func (l *netLab) gateways(st *Step) error {
	o := l.s.o
	for _, g := range []struct {
		name string
		e    keys.EnclaveID
		q    string
		net  string
		m    string
	}{{"gw-web", 1, "0", "10.91.0.0/16", "127.0.0.1:9201"}, {"gw-app", 2, "1", "10.93.0.0/16", "127.0.0.1:9202"}} {
		if _, err := o.issue(ca.Identity{Name: g.name, Role: ca.RoleGateway, Enclave: g.e}); err != nil {
			return err
		}
		for _, dir := range []string{"-s", "-d"} {
			if _, err := l.in(l.router, l.ipt, "-w", "-A", "FORWARD", dir, g.net, "-p", "udp", "-m", "multiport", "--ports", "1000,1001", "-j", "NFQUEUE", "--queue-num", g.q); err != nil {
				return err
			}
		}
		if err := l.spawn(g.name, l.router, l.bin, "gateway", "--ca", "ca/ca.crt", "--cert", "certs/"+g.name+".crt", "--key", "certs/"+g.name+".key",
			"--keyserver", "127.0.0.1:7443", "--nfqueue", g.q, "--flow-log", g.name+"-flows.jsonl", "--metrics-listen", g.m); err != nil {
			return err
		}
		if err := l.waitLog(g.name, `gateway up`); err != nil {
			return err
		}
	}
	st.fig("gw-web", "queue 0: traffic to or from 10.91.0.0/16 (enclave 1), reads 1-2")
	st.fig("gw-app", "queue 1: traffic to or from 10.93.0.0/16 (enclave 3), reads 2-3")
	return nil
}

func (l *netLab) agents(st *Step) error {
	o := l.s.o
	var peers []string
	for _, h := range netHosts {
		if h.role == ca.RoleServer {
			peers = append(peers, "--peer", h.overlay()+"/32="+h.underlay())
		}
	}
	for _, h := range netHosts {
		id := ca.Identity{Name: h.name, Role: h.role, Enclave: h.enclave, Overlay: netip.MustParsePrefix(h.overlay() + "/16")}
		if h.role == ca.RoleServer {
			id.ServerID, id.HasServerID = h.server, true
		}
		if _, err := o.issue(id); err != nil {
			return err
		}
		args := []string{l.bin, "agent", "--ca", "ca/ca.crt", "--cert", "certs/" + h.name + ".crt", "--key", "certs/" + h.name + ".key",
			"--listen", h.underlay(), "--tun", "enc0"}
		if h.role == ca.RoleServer {
			args = append(args, "--keyserver", l.keyServerAddr(h))
		} else {
			args = append(args, peers...)
		}
		if err := l.spawn(h.name, l.ns[h.name], args...); err != nil {
			return err
		}
	}
	for _, h := range netHosts {
		if err := l.waitLog(h.name, `agent listening`); err != nil {
			return err
		}
	}
	st.fig("agents", len(netHosts))
	return nil
}

// ping pings to from host's namespace and returns how many came back.
// It waits for every reply until a deadline 5 s past the last request
// (-w), not two round trips after it (what -W gives once one reply came):
// the first request waits for the SA's handshake, which on a loaded
// machine can take longer than the whole run of requests, and its reply
// then came after ping had stopped counting.
func (l *netLab) ping(from, to string, count int, interval string) (int, string) {
	iv, err := strconv.ParseFloat(interval, 64)
	if err != nil {
		return 0, err.Error()
	}
	deadline := int(float64(count)*iv) + 5
	out, _ := l.in(l.ns[from], "ping", "-c", strconv.Itoa(count), "-i", interval, "-w", strconv.Itoa(deadline), "-q", to)
	m := regexp.MustCompile(`(\d+) received`).FindStringSubmatch(out)
	if m == nil {
		return 0, out
	}
	n, _ := strconv.Atoi(m[1])
	return n, out
}

func (l *netLab) pings(st *Step) error {
	for _, p := range [][2]string{{"laptop", "app1"}, {"laptop", "web1"}, {"appcli", "db1"}, {"opsdesk", "ops1"}} {
		to := ""
		for _, h := range netHosts {
			if h.name == p[1] {
				to = h.overlay()
			}
		}
		n, out := l.ping(p[0], to, 3, "0.3")
		st.fig(p[0]+" → "+p[1], fmt.Sprintf("%d/3", n))
		if n != 3 {
			return fmt.Errorf("%s → %s: %s", p[0], p[1], out)
		}
	}
	return nil
}

func (l *netLab) refused(st *Step) error {
	n, _ := l.ping("laptop", "100.64.3.1", 2, "0.3")
	st.fig("laptop → db1", fmt.Sprintf("%d/2", n))
	if n != 0 {
		return errors.New("laptop reached db1 across the forbidden pair 1-3")
	}
	return nil
}

// gwMetric reads a gateway metric's value from its endpoint in the router.
func (l *netLab) gwMetric(addr, series string) float64 {
	out, err := l.in(l.router, "curl", "-sf", "http://"+addr+"/metrics")
	if err != nil {
		return -1
	}
	for _, line := range strings.Split(out, "\n") {
		if strings.HasPrefix(line, series+" ") {
			v, _ := strconv.ParseFloat(strings.TrimPrefix(line, series+" "), 64)
			return v
		}
	}
	return 0
}

func (l *netLab) leastPrivilege(st *Step) error {
	if _, err := exec.LookPath("curl"); err != nil {
		return errors.New("needs curl (apt-get install curl)")
	}
	read12 := l.gwMetric("127.0.0.1:9201", `enclave_gateway_pair_packets_total{outcome="read",pair="1-2"}`)
	opaque11 := l.gwMetric("127.0.0.1:9201", `enclave_gateway_pair_packets_total{outcome="opaque",pair="1-1"}`)
	read11 := l.gwMetric("127.0.0.1:9201", `enclave_gateway_pair_packets_total{outcome="read",pair="1-1"}`)
	read23 := l.gwMetric("127.0.0.1:9202", `enclave_gateway_pair_packets_total{outcome="read",pair="2-3"}`)
	st.fig("gw-web read 1-2", read12)
	st.fig("gw-web opaque 1-1", opaque11)
	st.fig("gw-web read 1-1", read11)
	st.fig("gw-app read 2-3", read23)
	if read12 <= 0 || opaque11 <= 0 || read11 != 0 || read23 <= 0 {
		return errors.New("a gateway read what it was not granted, or not what it was")
	}
	return nil
}

func (l *netLab) iperf(st *Step) error {
	if err := l.spawn("iperf3-server", l.ns["app1"], "iperf3", "-s", "-B", "100.64.2.1"); err != nil {
		return err
	}
	time.Sleep(300 * time.Millisecond)
	out, err := l.in(l.ns["laptop"], "iperf3", "-c", "100.64.2.1", "-t", "3", "--json")
	if err != nil {
		return err
	}
	var res struct {
		End struct {
			SumReceived struct {
				Bits float64 `json:"bits_per_second"`
			} `json:"sum_received"`
		} `json:"end"`
	}
	if err := json.Unmarshal([]byte(out), &res); err != nil || res.End.SumReceived.Bits == 0 {
		return fmt.Errorf("iperf3: %v: %s", err, tail(out, 500))
	}
	st.fig("TCP laptop → app1 through gw-web", fmt.Sprintf("%.2f Gbit/s", res.End.SumReceived.Bits/1e9))
	return nil
}

func (l *netLab) rotation(st *Step) error {
	admin := []string{l.bin, "admin", "--keyserver", "127.0.0.1:7443", "--ca", "ca/ca.crt", "--cert", "certs/alice.crt", "--key", "certs/alice.key"}
	// Past the grace of enrolment's own rotations, so that this one
	// happens at once.
	if !waitFor(20*time.Second, func() bool {
		out, err := l.in(l.router, append(admin, "status")...)
		return err == nil && regexp.MustCompile(`(?m)^  1-2 generation \d+ since \S+$`).MatchString(out) && l.sinceLast(out) > 6*time.Second
	}) {
		return errors.New("pair 1-2 never settled")
	}
	type result struct {
		n   int
		out string
	}
	done := make(chan result, 1)
	go func() {
		n, out := l.ping("laptop", "100.64.2.1", 150, "0.02")
		done <- result{n, out}
	}()
	time.Sleep(time.Second)
	out, err := l.in(l.router, append(admin, "rotate", "--pair", "1-2")...)
	if err != nil {
		return err
	}
	r := <-done
	st.fig("rotation", strings.TrimSpace(strings.Split(out, "\n")[len(strings.Split(strings.TrimSpace(out), "\n"))-1]))
	st.fig("pings answered", fmt.Sprintf("%d/150", r.n))
	if !strings.Contains(out, "rotated") {
		return fmt.Errorf("rotate: %s", out)
	}
	if r.n != 150 {
		return fmt.Errorf("%d of 150 pings lost across the rotation", 150-r.n)
	}
	return nil
}

// sinceLast reads pair 1-2's last rotation time from `admin status`.
func (l *netLab) sinceLast(status string) time.Duration {
	m := regexp.MustCompile(`(?m)^  1-2 generation \d+ since (\S+)`).FindStringSubmatch(status)
	if m == nil {
		return 0
	}
	t, err := time.Parse(time.RFC3339, m[1])
	if err != nil {
		return 0
	}
	return time.Since(t)
}
