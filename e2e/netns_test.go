package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/enclavekeys/enclave/internal/agent"
)

// topology is three network namespaces made by the test: host A, a router
// forwarding between two veth links, host B.
//
//	A (10.98.1.2) ── vethA|vethRA (10.98.1.1) router (10.98.2.1) vethRB|vethB ── B (10.98.2.2)
//
// The key server runs in the router's namespace; agents on TUN devices run
// in A (a client) and B (a server). Everything is removed when the test
// ends, whether it passed or not.
type topology struct {
	t          *testing.T
	a, r, b    string
	procs      []*exec.Cmd
	byName     map[string]*exec.Cmd
	logs       map[string]*lockedBuffer
	underlayRB string
}

func needNetns(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("network namespace tests need root (CI runs as root)")
	}
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		t.Skip("the kernel has no TUN device (/dev/net/tun)")
	}
	for _, tool := range []string{"ip", "ping", "iperf3", "tcpdump", "curl"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s is not installed (.ci/run installs iproute2, iputils-ping, iperf3, tcpdump and curl)", tool)
		}
	}
}

func newTopology(t *testing.T) *topology {
	t.Helper()
	id := fmt.Sprintf("%d", os.Getpid()%100000)
	tp := &topology{t: t, a: "encA" + id, r: "encR" + id, b: "encB" + id, logs: map[string]*lockedBuffer{}, byName: map[string]*exec.Cmd{}}
	t.Cleanup(tp.cleanup)
	for _, ns := range []string{tp.a, tp.r, tp.b} {
		tp.ip("netns", "add", ns)
		tp.ip("-n", ns, "link", "set", "lo", "up")
	}
	tp.ip("link", "add", "vA"+id, "netns", tp.a, "type", "veth", "peer", "name", "vRA"+id, "netns", tp.r)
	tp.ip("link", "add", "vB"+id, "netns", tp.b, "type", "veth", "peer", "name", "vRB"+id, "netns", tp.r)
	tp.underlayRB = "vRB" + id
	for _, c := range [][]string{
		{tp.a, "vA" + id, "10.98.1.2/24"}, {tp.r, "vRA" + id, "10.98.1.1/24"},
		{tp.r, "vRB" + id, "10.98.2.1/24"}, {tp.b, "vB" + id, "10.98.2.2/24"},
	} {
		tp.ip("-n", c[0], "addr", "add", c[2], "dev", c[1])
		tp.ip("-n", c[0], "link", "set", c[1], "up")
	}
	tp.ip("-n", tp.a, "route", "add", "default", "via", "10.98.1.1")
	tp.ip("-n", tp.b, "route", "add", "default", "via", "10.98.2.1")
	tp.in(tp.r, "sysctl", "-qw", "net.ipv4.ip_forward=1")
	return tp
}

// metric reads one Prometheus sample (name with its labels, as exposed)
// from a process's metrics at addr in the router's namespace; 0 when it
// has none.
func (tp *topology) metric(addr, name string) float64 {
	tp.t.Helper()
	m := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(name) + ` (\S+)$`).FindStringSubmatch(tp.in(tp.r, "curl", "-sf", addr+"/metrics"))
	if m == nil {
		return 0
	}
	v, _ := strconv.ParseFloat(m[1], 64)
	return v
}

// underlayA and underlayB are A's and B's links to the router.
func (tp *topology) underlayA() string { return "vA" + strings.TrimPrefix(tp.a, "encA") }
func (tp *topology) underlayB() string { return "vB" + strings.TrimPrefix(tp.b, "encB") }

func (tp *topology) ip(args ...string) {
	tp.t.Helper()
	if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
		tp.t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, out)
	}
}

// in runs a command in namespace ns and returns its output.
func (tp *topology) in(ns string, args ...string) string {
	tp.t.Helper()
	out, err := exec.Command("ip", append([]string{"netns", "exec", ns}, args...)...).CombinedOutput()
	if err != nil {
		tp.t.Fatalf("%s: %s: %v: %s", ns, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// spawn starts a long-running command in ns, in dir, until cleanup.
func (tp *topology) spawn(name, ns, dir string, args ...string) {
	tp.t.Helper()
	cmd := exec.Command("ip", append([]string{"netns", "exec", ns}, args...)...)
	cmd.Dir = dir
	log := &lockedBuffer{}
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		tp.t.Fatal(err)
	}
	tp.procs = append(tp.procs, cmd)
	tp.byName[name] = cmd
	tp.logs[name] = log
}

// stop interrupts a spawned command (it may flush and clean up) and
// waits for it, killing it after 10 seconds.
func (tp *topology) stop(name string) {
	tp.t.Helper()
	cmd := tp.byName[name]
	if cmd == nil {
		tp.t.Fatalf("no process %s", name)
	}
	cmd.Process.Signal(os.Interrupt)
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		cmd.Process.Kill()
		<-done
	}
}

func (tp *topology) cleanup() {
	for _, p := range tp.procs {
		p.Process.Kill()
		p.Wait()
	}
	if tp.t.Failed() {
		for name, l := range tp.logs {
			tp.t.Logf("%s:\n%s", name, l)
		}
	}
	for _, ns := range []string{tp.a, tp.r, tp.b} {
		exec.Command("ip", "netns", "del", ns).Run() // takes its links with it
	}
}

// waitLog waits for a log line matching re from a spawned command.
func (tp *topology) waitLog(name string, re *regexp.Regexp) {
	tp.t.Helper()
	for i := 0; i < 200; i++ {
		if re.MatchString(tp.logs[name].String()) {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	tp.t.Fatalf("%s never logged %s", name, re)
}

// TestTunnelNetns: agents on TUN devices in two namespaces with a router
// between them: ping and a TCP transfer through the SA; a capture of the
// underlay holds only the data and control ports, and its data packets
// open with the server's key; a rotation under a UDP stream loses nothing.
func TestTunnelNetns(t *testing.T) {
	needNetns(t)
	e := newEnv(t)
	tp := newTopology(t)
	admin := tp.startOrg(e, "--grace", "5s")
	tp.startAgents(e)

	pcap := filepath.Join(e.dir, "underlay.pcap")
	// The agents send runs of datagrams with UDP segmentation offload; a
	// capture sees a run whole unless the device it is taken on cuts it
	// into the datagrams the wire carries, as this one is made to.
	tp.in(tp.r, "ip", "link", "set", "dev", tp.underlayRB, "gso_max_segs", "1")
	tp.spawn("tcpdump", tp.r, e.dir, "tcpdump", "--immediate-mode", "-i", tp.underlayRB, "-w", pcap, "-U", "udp")
	time.Sleep(500 * time.Millisecond)

	out := tp.in(tp.a, "ping", "-c", "3", "-w", "8", "100.64.3.10") // -w: the first reply waits for the handshake
	if !strings.Contains(out, " 0% packet loss") && !strings.Contains(out, "3 received") {
		t.Fatalf("ping through the tunnel:\n%s", out)
	}
	tp.spawn("iperf3-server", tp.b, e.dir, "iperf3", "-s", "-B", "100.64.3.10")
	time.Sleep(300 * time.Millisecond)
	if got := tp.iperfTCP("20M"); got < 10<<20 {
		t.Fatalf("TCP transfer through the tunnel: %d bytes received", got)
	}

	// Path MTU: with the TUN device's MTU raised over the tunnel's, an
	// oversize packet without Don't Fragment is fragmented by the agent
	// and answered, and one with it gets ICMP "fragmentation needed" with
	// the tunnel's MTU, as from a router (after which the stack fragments
	// by itself).
	tp.in(tp.a, "ip", "link", "set", "dev", "enc0", "mtu", "1500")
	if out := tp.in(tp.a, "ping", "-c", "2", "-W", "3", "-M", "dont", "-s", "1450", "100.64.3.10"); !strings.Contains(out, "2 received") {
		t.Fatalf("an oversize ping without DF:\n%s", out)
	}
	df, _ := exec.Command("ip", "netns", "exec", tp.a, "ping", "-c", "1", "-W", "3", "-M", "do", "-s", "1450", "100.64.3.10").CombinedOutput()
	if !regexp.MustCompile(`mtu ?= ?` + strconv.Itoa(agent.DefaultMTU)).Match(df) {
		t.Fatalf("an oversize ping with DF got no fragmentation-needed error with the tunnel's MTU:\n%s", df)
	}
	tp.in(tp.a, "ip", "link", "set", "dev", "enc0", "mtu", strconv.Itoa(agent.DefaultMTU))
	metrics := tp.in(tp.a, "curl", "-sf", "127.0.0.1:9100/metrics")
	for _, want := range []string{"enclave_agent_icmp_too_big_total 1", "enclave_agent_fragmented_total 2"} {
		if !strings.Contains(metrics, want+"\n") {
			t.Fatalf("the client's metrics lack %q", want)
		}
	}
	t.Logf("an oversize ping with DF: %s", regexp.MustCompile(`.*mtu ?= ?\d+`).Find(df))

	// A rotation under a UDP stream: iperf3 counts every datagram lost.
	time.Sleep(5 * time.Second) // past the pair's grace
	udp := make(chan string, 1)
	go func() {
		out, _ := exec.Command("ip", "netns", "exec", tp.a, "iperf3", "-c", "100.64.3.10", "-u", "-b", "20M", "-l", "1200", "-t", "6", "--json").CombinedOutput()
		udp <- string(out)
	}()
	time.Sleep(2 * time.Second)
	rot := tp.inDir(tp.r, e.dir, append(admin, "rotate", "--pair", "3-7")...)
	if !strings.Contains(rot, "rotated") {
		t.Fatalf("rotate: %s", rot)
	}
	var res struct {
		End struct {
			Sum struct {
				Packets     int64 `json:"packets"`
				LostPackets int64 `json:"lost_packets"`
			} `json:"sum"`
		} `json:"end"`
	}
	raw := <-udp
	if err := json.Unmarshal([]byte(raw), &res); err != nil || res.End.Sum.Packets == 0 {
		t.Fatalf("iperf3 UDP: %v\n%s", err, raw)
	}
	if res.End.Sum.LostPackets != 0 {
		t.Fatalf("%d of %d datagrams lost across the rotation", res.End.Sum.LostPackets, res.End.Sum.Packets)
	}
	if !regexp.MustCompile(`"rekey"`).MatchString(tp.logs["client"].String()) {
		t.Fatal("the client did not re-establish its SA after the rotation")
	}

	// The capture: only the data and control ports, and the data packets
	// open with the server's key (both generations are served during grace).
	time.Sleep(500 * time.Millisecond)
	tp.procs[len(tp.procs)-2].Process.Signal(os.Interrupt) // tcpdump: flush and stop
	time.Sleep(500 * time.Millisecond)
	other, err := exec.Command("ip", "netns", "exec", tp.r, "tcpdump", "-nr", pcap, "udp and not (port 1000 or port 1001)").Output()
	if err != nil || strings.TrimSpace(string(other)) != "" {
		t.Fatalf("reading the capture (%v), or other UDP traffic on the underlay:\n%s", err, other)
	}
	// The server's keys of both generations, derived from the org key the
	// key server was given (as a monitor holding it would).
	var served []string
	for _, g := range []string{"1", "2"} {
		served = append(served, strings.TrimSpace(e.ok("keys", "derive", "--org-key", "@org.key", "--enclaves", "3,7", "--generation", g, "--server", "400")))
	}
	// Each data packet opens with the key of its generation: a line of
	// output per packet, the inner packet in hex or an error.
	var opened []bool
	for g, k := range served {
		_, out, _ := e.run("packet", "open", "--server-key", k, "--pcap", pcap)
		lines := strings.Split(strings.TrimSpace(out), "\n")
		if opened == nil {
			opened = make([]bool, len(lines))
		}
		if len(lines) != len(opened) || len(lines) < 100 {
			t.Fatalf("generation %d: %d lines of output for %d packets", g+1, len(lines), len(opened))
		}
		for i, l := range lines {
			opened[i] = opened[i] || !strings.HasPrefix(l, "error:")
		}
	}
	for i, ok := range opened {
		if !ok {
			t.Fatalf("data packet %d of the capture opens with neither of the server's keys", i+1)
		}
	}
	t.Logf("%d data packets captured on the underlay, all opened with the server's keys", len(opened))
}

// startOrg issues the tunnel tests' certificates (a key server on the
// router at 10.98.2.1, an admin, a server in enclave 3 at 100.64.3.10, a
// client in enclave 7 at 100.64.7.10, a gateway standing in 7), starts the
// key server in the router's namespace with extra flags, registers them
// with pair 3-7 allowed, and returns the admin command's prefix.
func (tp *topology) startOrg(e *env, extra ...string) []string {
	tp.t.Helper()
	e.issue("ks", "keyserver", "--host", "10.98.2.1")
	e.issue("alice", "admin")
	e.issue("srv", "server", "--enclave", "3", "--server-id", "400", "--ip", "100.64.3.10/16")
	e.issue("cli", "client", "--enclave", "7", "--ip", "100.64.7.10/16")
	e.issue("gw", "gateway", "--enclave", "7")
	e.ok("keys", "generate", "--out", "kek")
	e.ok("keys", "generate", "--out", "org.key")
	os.Chmod(filepath.Join(e.dir, "kek"), 0o600)
	tp.spawn("keyserver", tp.r, e.dir, append([]string{binary, "keyserver", "--ca", "ca/ca.crt", "--cert", "certs/ks.crt", "--key", "certs/ks.key",
		"--store", "ks.db", "--audit", "audit.log", "--kek-file", "kek", "--org-key-file", "org.key", "--listen", "10.98.2.1:7443", "--metrics-listen", ""}, extra...)...)
	tp.waitLog("keyserver", regexp.MustCompile(`key service listening`))
	admin := []string{binary, "admin", "--keyserver", "10.98.2.1:7443", "--ca", "ca/ca.crt", "--cert", "certs/alice.crt", "--key", "certs/alice.key"}
	for _, a := range [][]string{
		{"enclave", "add", "--id", "3", "--name", "web"}, {"enclave", "add", "--id", "7", "--name", "db"},
		{"device", "add", "--name", "srv", "--role", "server", "--enclave", "3", "--server-id", "400"},
		{"device", "add", "--name", "cli", "--role", "client", "--enclave", "7"},
		{"device", "add", "--name", "gw", "--role", "gateway", "--enclave", "7"},
		{"pair", "allow", "3-7"},
	} {
		tp.inDir(tp.r, e.dir, append(admin, a...)...)
	}
	return admin
}

// startAgents starts the server agent in B and the client agent in A, on
// TUN devices, the client with metrics on 127.0.0.1:9100 in its namespace;
// serverExtra are more flags for the server.
func (tp *topology) startAgents(e *env, serverExtra ...string) {
	tp.t.Helper()
	tp.spawn("server", tp.b, e.dir, append([]string{binary, "agent", "--ca", "ca/ca.crt", "--cert", "certs/srv.crt", "--key", "certs/srv.key",
		"--keyserver", "10.98.2.1:7443", "--listen", "10.98.2.2", "--tun", "enc0"}, serverExtra...)...)
	tp.spawn("client", tp.a, e.dir, binary, "agent", "--ca", "ca/ca.crt", "--cert", "certs/cli.crt", "--key", "certs/cli.key",
		"--listen", "10.98.1.2", "--tun", "enc0", "--peer", "100.64.3.0/24=10.98.2.2", "--metrics-listen", "127.0.0.1:9100")
	tp.waitLog("server", regexp.MustCompile(`agent listening`))
	tp.waitLog("client", regexp.MustCompile(`agent listening`))
}

// iperfTCP sends n bytes (iperf3's -n) from A to the iperf3 server at
// 100.64.3.10 and returns how many the far side received (iperf3 ends
// when the last byte is written, so some may still be on their way).
func (tp *topology) iperfTCP(n string) int64 {
	tp.t.Helper()
	var res struct {
		End struct {
			SumReceived struct {
				Bytes int64 `json:"bytes"`
			} `json:"sum_received"`
		} `json:"end"`
	}
	out := tp.in(tp.a, "iperf3", "-c", "100.64.3.10", "-n", n, "--json")
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		tp.t.Fatalf("iperf3: %v\n%s", err, out)
	}
	return res.End.SumReceived.Bytes
}

// inDir is in with a working directory.
func (tp *topology) inDir(ns, dir string, args ...string) string {
	tp.t.Helper()
	cmd := exec.Command("ip", append([]string{"netns", "exec", ns}, args...)...)
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	if err != nil {
		tp.t.Fatalf("%s: %s: %v: %s", ns, strings.Join(args, " "), err, out)
	}
	return string(out)
}
