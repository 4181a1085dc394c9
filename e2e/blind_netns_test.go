//go:build linux

package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestInlineGatewayKilledUnderTraffic (issue 30, item 2): an inline
// gateway that cannot derive (--no-derive) is killed with SIGKILL under a
// running TCP transfer and restarted at once. The new process holds none
// of the old one's SA keys: it holds the SA's packets (fail closed), tells
// the client from a raw socket, as from the server, that the SA is not
// held, and the client's new SA, whose keys the server delivers to the
// gateway, is read from its first packet. The flow log has the transfer
// from within a second of the restart, the blind window is under a
// second, and a flow the policy denies, running through the restart,
// never reaches the far side.
func TestInlineGatewayKilledUnderTraffic(t *testing.T) { gatewayKilledUnderTraffic(t, false) }

// TestRelayKilledUnderTraffic: the same with a --no-derive relay on the
// router, the client agent sending through it (--via): the new relay
// tells the client, framed as from the server.
func TestRelayKilledUnderTraffic(t *testing.T) { gatewayKilledUnderTraffic(t, true) }

func gatewayKilledUnderTraffic(t *testing.T, relay bool) {
	needNetns(t)
	ipt := iptablesFor(t)
	e := newEnv(t)
	os.WriteFile(filepath.Join(e.dir, "policy.yaml"), []byte("deny:\n  - {proto: udp, dst_port: 5998}\n"), 0o600)
	tp := newTopology(t)
	admin := tp.startOrg(e)
	tp.inDir(tp.r, e.dir, append(admin, "grant", "add", "--device", "gw", "--pairs", "3-7")...)
	front := []string{"--nfqueue", "0,1"}
	if relay {
		front = []string{"--relay", "10.98.1.1:1100", "--relay-to", "10.98.2.0/24"}
	} else {
		tp.in(tp.r, ipt, "-w", "-A", "FORWARD", "-p", "udp", "-m", "multiport", "--ports", "1000,1001", "-j", "NFQUEUE", "--queue-balance", "0:1")
	}
	gateway := func(name, flows string) time.Time {
		tp.spawn(name, tp.r, e.dir, append(append([]string{binary, "gateway", "--ca", "ca/ca.crt", "--cert", "certs/gw.crt", "--key", "certs/gw.key",
			"--keyserver", "10.98.2.1:7443"}, front...), "--no-derive", "--flow-log", flows, "--flow-idle", "1s",
			"--policy", "policy.yaml", "--metrics-listen", "127.0.0.1:9200", "--status-socket", name+".sock")...)
		tp.waitLog(name, regexp.MustCompile(`gateway up`))
		return time.Now()
	}
	gateway("gateway", "flows1.jsonl")
	if relay {
		tp.spawn("server", tp.b, e.dir, binary, "agent", "--ca", "ca/ca.crt", "--cert", "certs/srv.crt", "--key", "certs/srv.key",
			"--keyserver", "10.98.2.1:7443", "--listen", "10.98.2.2", "--tun", "enc0")
		tp.spawn("client", tp.a, e.dir, binary, "agent", "--ca", "ca/ca.crt", "--cert", "certs/cli.crt", "--key", "certs/cli.key",
			"--listen", "10.98.1.2", "--tun", "enc0", "--peer", "100.64.3.0/24=10.98.2.2", "--via", "10.98.1.1:1100", "--mtu", "1370")
		tp.waitLog("server", regexp.MustCompile(`agent listening`))
		tp.waitLog("client", regexp.MustCompile(`agent listening`))
	} else {
		tp.startAgents(e)
	}
	if out := tp.in(tp.a, "ping", "-c", "2", "-i", "0.3", "-w", "6", "100.64.3.10"); !strings.Contains(out, "2 received") {
		t.Fatalf("ping through the inline gateway:\n%s", out)
	}

	// A paced transfer of 8 seconds, and a flow the policy denies: a
	// datagram to port 5998 every 20 ms, watched for on the far side.
	tp.spawn("iperf3-server", tp.b, e.dir, "iperf3", "-s", "-B", "100.64.3.10")
	capture := filepath.Join(e.dir, "denied.pcap")
	tp.spawn("tcpdump", tp.b, e.dir, "tcpdump", "--immediate-mode", "-i", "enc0", "-w", capture, "-U", "udp port 5998")
	tp.waitLog("tcpdump", regexp.MustCompile(`listening on`))
	time.Sleep(300 * time.Millisecond)
	tp.spawn("iperf3", tp.a, e.dir, "iperf3", "-c", "100.64.3.10", "-t", "8", "-b", "100M")
	tp.spawn("denied", tp.a, e.dir, "bash", "-c", "for i in $(seq 450); do echo denied >/dev/udp/100.64.3.10/5998; sleep 0.02; done")
	time.Sleep(2 * time.Second)

	old := tp.byName["gateway"]
	old.Process.Kill() // SIGKILL: nothing flushed, nothing handed over
	old.Wait()
	up := gateway("gateway2", "flows2.jsonl")

	// The transfer goes on through the new process.
	tp.byName["iperf3"].Wait()
	if out := tp.logs["iperf3"].String(); !strings.Contains(out, "receiver") {
		t.Fatalf("iperf3 through the restarted gateway:\n%s", out)
	}
	tp.byName["denied"].Wait()
	time.Sleep(300 * time.Millisecond)
	tp.stop("tcpdump")
	if out, _ := exec.Command("tcpdump", "-nr", capture).Output(); strings.TrimSpace(string(out)) != "" {
		t.Fatalf("packets of the denied flow reached the far side:\n%s", out)
	}
	status := tp.inDir(tp.r, e.dir, binary, "status", "--socket", "gateway2.sock")
	metrics := tp.in(tp.r, "curl", "-sf", "127.0.0.1:9200/metrics")
	tp.stop("gateway2") // writes every flow's line

	// The flow log of the new process: the transfer's flow, read from
	// within a second of the restart, and the denied flow, denied.
	var first time.Time
	var bytes int64
	denied := false
	for _, f := range readFlows(t, filepath.Join(e.dir, "flows2.jsonl")) {
		switch {
		case f.Proto == 6 && f.DstPort == 5201 && f.Verdict == "pass":
			if first.IsZero() || f.First.Before(first) {
				first = f.First
			}
			bytes += f.Bytes
		case f.Proto == 17 && f.DstPort == 5998:
			denied = denied || f.Verdict == "deny"
			if f.Verdict != "deny" {
				t.Errorf("the denied flow's line says %q", f.Verdict)
			}
		}
	}
	if first.IsZero() {
		raw, _ := os.ReadFile(filepath.Join(e.dir, "flows2.jsonl"))
		t.Fatalf("the restarted gateway's flow log has no line of the transfer:\n%s\n%s", raw, grepLines(metrics, "enclave_gateway_p"))
	}
	after := first.Sub(up)
	t.Logf("the restarted gateway read the transfer %v after it was up (%d bytes logged); status:\n%s", after.Round(time.Millisecond), bytes, status)
	if after > time.Second {
		t.Errorf("the transfer was first read %v after the gateway was up: more than a second", after)
	}
	if !denied {
		t.Errorf("no line of the denied flow in the restarted gateway's flow log")
	}
	m := regexp.MustCompile(`(?m)^enclave_gateway_blind_window_seconds_(sum|count) (\S+)$`).FindAllStringSubmatch(metrics, -1)
	if len(m) != 2 {
		t.Fatalf("no blind window measured:\n%s", grepLines(metrics, "blind"))
	}
	sum, _ := strconv.ParseFloat(m[0][2], 64)
	count, _ := strconv.ParseFloat(m[1][2], 64)
	if count < 1 || sum/count > 1 {
		t.Errorf("blind windows: %v in %v s", count, sum)
	}
	if !regexp.MustCompile(`pair 3-7 was last held unread for \d+`).MatchString(status) {
		t.Errorf("enclave status does not show the window:\n%s", status)
	}
	if unread := regexp.MustCompile(`enclave_gateway_pair_packets_total\{outcome="opaque",pair="3-7"\} ([1-9]\d*)`).FindStringSubmatch(metrics); unread != nil {
		t.Errorf("%s packets of the granted pair passed the restarted gateway unread", unread[1])
	}
}
