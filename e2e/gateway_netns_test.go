package e2e

import (
	"bufio"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// iptablesFor returns the iptables that drives xt_NFQUEUE (the legacy one
// where both are installed), or skips.
func iptablesFor(t *testing.T) string {
	t.Helper()
	for _, tool := range []string{"iptables-legacy", "iptables"} {
		if p, err := exec.LookPath(tool); err == nil {
			return p
		}
	}
	t.Skip("iptables is not installed (.ci/run installs it)")
	return ""
}

// TestGatewayInlineNetns: the TUN tunnel's topology with the router
// running the gateway inline on two netfilter queues, granted the pair.
// Ping and TCP pass through it; its flow log names the inner flows; tshark
// reads its decrypted capture and shows the inner ICMP and TCP; a flow its
// policy denies never reaches the far side. With the gateway stopped the
// rule's default drops the traffic, and with --queue-bypass (the
// fail-open set-up) it passes.
func TestGatewayInlineNetns(t *testing.T) {
	needNetns(t)
	ipt := iptablesFor(t)
	if _, err := exec.LookPath("tshark"); err != nil {
		t.Skip("tshark is not installed (.ci/run installs it)")
	}
	e := newEnv(t)
	os.WriteFile(filepath.Join(e.dir, "policy.yaml"), []byte("deny:\n  - {proto: tcp, dst_port: 5999}\n"), 0o600)
	tp := newTopology(t)
	admin := tp.startOrg(e)
	tp.inDir(tp.r, e.dir, append(admin, "grant", "add", "--device", "gw", "--pairs", "3-7")...)
	rule := func(op string, bypass bool) {
		args := []string{ipt, "-w", op, "FORWARD", "-p", "udp", "-m", "multiport", "--ports", "1000,1001", "-j", "NFQUEUE", "--queue-balance", "0:1"}
		if bypass {
			args = append(args, "--queue-bypass")
		}
		tp.in(tp.r, args...)
	}
	rule("-A", false)
	gateway := func(name string, extra ...string) {
		args := append([]string{binary, "gateway", "--ca", "ca/ca.crt", "--cert", "certs/gw.crt", "--key", "certs/gw.key",
			"--keyserver", "10.98.2.1:7443", "--nfqueue", "0,1"}, extra...)
		tp.spawn(name, tp.r, e.dir, args...)
		tp.waitLog(name, regexp.MustCompile(`gateway up`))
	}
	gateway("gateway", "--flow-log", "flows.jsonl", "--flow-idle", "1s", "--pcap", "inner.pcapng", "--policy", "policy.yaml", "--metrics-listen", "127.0.0.1:9200",
		"--status-socket", "gw.sock")
	tp.startAgents(e)

	ping := func(n string) string {
		out, _ := exec.Command("ip", "netns", "exec", tp.a, "ping", "-c", n, "-i", "0.3", "-w", "6", "100.64.3.10").CombinedOutput() // -w: every reply until the deadline, the first held for the handshake included
		return string(out)
	}
	if out := ping("3"); !strings.Contains(out, "3 received") {
		t.Fatalf("ping through the inline gateway:\n%s", out)
	}
	tp.spawn("iperf3-server", tp.b, e.dir, "iperf3", "-s", "-B", "100.64.3.10")
	time.Sleep(300 * time.Millisecond)
	received := tp.iperfTCP("10M")
	if received < 1<<20 {
		t.Fatalf("TCP through the inline gateway: %d bytes received", received)
	}

	// The denied flow: a listener on 5999 on the far side, a capture of
	// its TUN device, and a connection attempt that must never arrive.
	// Captures that must stay empty run with --immediate-mode: without it
	// the kernel hands tcpdump packets in blocks retired after a timeout,
	// and a capture stopped within it writes nothing whatever passed.
	tp.spawn("listener", tp.b, e.dir, "iperf3", "-s", "-B", "100.64.3.10", "-p", "5999")
	denied := filepath.Join(e.dir, "denied.pcap")
	tp.spawn("tcpdump-b", tp.b, e.dir, "tcpdump", "--immediate-mode", "-i", "enc0", "-w", denied, "-U", "tcp port 5999")
	time.Sleep(500 * time.Millisecond)
	if out, err := exec.Command("ip", "netns", "exec", tp.a, "iperf3", "-c", "100.64.3.10", "-p", "5999", "-t", "1", "--connect-timeout", "2000").CombinedOutput(); err == nil {
		t.Fatalf("a denied flow connected:\n%s", out)
	}
	tp.stop("tcpdump-b")
	if out, _ := exec.Command("tcpdump", "-nr", denied).Output(); strings.TrimSpace(string(out)) != "" {
		t.Fatalf("packets of the denied flow reached the far side:\n%s", out)
	}

	// A datagram to the data port fragmented on the way: the gateway
	// cannot judge it whole and drops its first fragment (fail closed),
	// so nothing of it reaches B but a later fragment that cannot be
	// reassembled (before, the first fragment was passed unjudged).
	frags := filepath.Join(e.dir, "frags.pcap")
	tp.spawn("tcpdump-frag", tp.b, e.dir, "tcpdump", "--immediate-mode", "-i", "vB"+strings.TrimPrefix(tp.b, "encB"), "-w", frags, "-U", "ip[6:2] & 0x1fff == 0 and ip[6] & 0x20 != 0")
	tp.waitLog("tcpdump-frag", regexp.MustCompile(`listening on`))
	tp.in(tp.a, "bash", "-c", "head -c 3000 /dev/zero >/dev/udp/10.98.2.2/1000")
	time.Sleep(500 * time.Millisecond)
	tp.stop("tcpdump-frag")
	if out, _ := exec.Command("tcpdump", "-nr", frags).Output(); strings.TrimSpace(string(out)) != "" {
		t.Fatalf("a first fragment of the data port passed the gateway:\n%s", out)
	}

	// enclave status asks the gateway over its socket (a file: any
	// namespace reaches it).
	status := tp.inDir(tp.r, e.dir, binary, "status", "--socket", "gw.sock")
	t.Logf("enclave status:\n%s", status)
	for _, want := range []string{"gateway gw (", "inline on netfilter queues [0 1] (fail closed)", "granted pairs: 3-7", "pair keys held: 3-7",
		"pair 3-7: ", "read ", "data packets: ", "denied ", "fragment dropped ", "control packets: ", "tagged "} {
		if !strings.Contains(status, want) {
			t.Errorf("gateway status lacks %q:\n%s", want, status)
		}
	}

	// The flow log (written a second after each flow goes quiet) and
	// the metrics.
	time.Sleep(2 * time.Second)
	metrics := tp.in(tp.r, "curl", "-sf", "127.0.0.1:9200/metrics")
	for _, re := range []string{`enclave_gateway_pair_packets_total\{outcome="read",pair="3-7"\} [1-9]`, `enclave_gateway_packets_total\{kind="data",outcome="denied"\} [1-9]`,
		`enclave_gateway_packets_total\{kind="control",outcome="tagged"\} [1-9]`, `enclave_gateway_packets_total\{kind="data",outcome="fragment_dropped"\} [1-9]`} {
		if !regexp.MustCompile(re).MatchString(metrics) {
			t.Fatalf("the gateway's metrics lack %s:\n%s", re, grepLines(metrics, "enclave_gateway"))
		}
	}
	tp.stop("gateway")
	flows := readFlows(t, filepath.Join(e.dir, "flows.jsonl"))
	var icmp, iperf, deny bool
	for _, f := range flows {
		if f.Pair != "3-7" {
			t.Errorf("flow of pair %s", f.Pair)
		}
		switch {
		case f.Proto == 1 && f.Src == "100.64.7.10" && f.Dst == "100.64.3.10":
			icmp = true
		case f.Proto == 6 && f.DstPort == 5201 && f.Bytes > received: // the payload the far side received, and headers
			iperf = true
		case f.Proto == 6 && f.DstPort == 5999 && f.Verdict == "deny":
			deny = true
		}
	}
	if !icmp || !iperf || !deny {
		t.Fatalf("flows: icmp %v, iperf3 TCP %v, denied %v, in %+v", icmp, iperf, deny, flows)
	}
	out, err := exec.Command("tshark", "-r", filepath.Join(e.dir, "inner.pcapng"), "-T", "fields", "-e", "_ws.col.Protocol", "-e", "ip.dst", "-e", "frame.comment").CombinedOutput()
	if err != nil {
		t.Fatalf("tshark: %v: %s", err, out)
	}
	for _, want := range []string{"ICMP\t100.64.3.10\tsa spi=", "TCP\t100.64.3.10\tsa spi="} {
		if !strings.Contains(string(out), want) {
			t.Fatalf("tshark shows no %q in the decrypted capture:\n%.1500s", want, out)
		}
	}

	// Fail closed: no gateway, and the rule without --queue-bypass drops.
	if out := ping("2"); strings.Contains(out, " 0% packet loss") || !strings.Contains(out, "100% packet loss") {
		t.Fatalf("traffic passed with the gateway stopped and no bypass:\n%s", out)
	}
	// Restarted without --fail-open: traffic passes again as soon as it is
	// up (it holds the pair key: the running SA is read at once). This one
	// takes no run whole (--runs-by-datagram): the kernel queues every
	// datagram alone, and a transfer still crosses it read.
	gateway("gateway-again", "--runs-by-datagram", "--status-socket", "gw-again.sock")
	up := time.Now()
	for {
		out, _ := exec.Command("ip", "netns", "exec", tp.a, "ping", "-c", "1", "-W", "1", "100.64.3.10").CombinedOutput()
		if strings.Contains(string(out), "1 received") {
			break
		}
		if time.Since(up) > 10*time.Second {
			t.Fatalf("no ping through the restarted gateway in 10 s:\n%s", out)
		}
	}
	t.Logf("a ping passed the restarted gateway %v after it was up", time.Since(up).Round(time.Millisecond))
	if got := tp.iperfTCP("5M"); got < 1<<20 {
		t.Fatalf("TCP through the gateway taking runs datagram by datagram: %d bytes", got)
	}
	if status := tp.inDir(tp.r, e.dir, binary, "status", "--socket", "gw-again.sock"); !strings.Contains(status, "runs: datagram by datagram: --runs-by-datagram") ||
		!regexp.MustCompile(`pair 3-7: .*read [1-9]`).MatchString(status) {
		t.Errorf("the gateway taking runs datagram by datagram:\n%s", status)
	}
	tp.stop("gateway-again")
	// Fail open: the rule with --queue-bypass and a --fail-open gateway;
	// the gateway holds the pair key, so it reads the running SA at once.
	rule("-D", false)
	rule("-A", true)
	gateway("gateway2", "--fail-open")
	if out := ping("2"); !strings.Contains(out, "2 received") {
		t.Fatalf("ping through the fail-open gateway:\n%s", out)
	}
	tp.stop("gateway2")
	if out := ping("2"); !strings.Contains(out, "2 received") {
		t.Fatalf("ping with the fail-open gateway stopped:\n%s", out)
	}
}

// flowLine is a line of the gateway's flow log.
type flowLine struct {
	Proto   int       `json:"proto"`
	Src     string    `json:"src"`
	Dst     string    `json:"dst"`
	DstPort int       `json:"dst_port"`
	Pair    string    `json:"pair"`
	Bytes   int64     `json:"bytes"`
	Verdict string    `json:"verdict"`
	First   time.Time `json:"first"`
}

func readFlows(t *testing.T, path string) []flowLine {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []flowLine
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var l flowLine
		if err := json.Unmarshal(sc.Bytes(), &l); err != nil {
			t.Fatalf("flow log line %q: %v", sc.Text(), err)
		}
		out = append(out, l)
	}
	return out
}

func grepLines(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}
