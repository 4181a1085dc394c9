//go:build linux

package e2e

import (
	"encoding/json"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/netnstest"
	"github.com/enclavekeys/enclave/internal/orgtest"
	"github.com/enclavekeys/enclave/internal/packet"
)

// TestGatewayRunsNetns: the inline gateway takes the agents' segmentation-
// offloaded runs whole and still reads every datagram: a TCP transfer
// crosses it as runs, and the bytes its flow log counts from the client
// equal the bytes the server agent received. Runs the test makes itself
// (sealed with keys derived from the org key, sent with UDP_SEGMENT from
// the client's namespace) show the one verdict per run: a run of allowed
// datagrams reaches the far side; a run holding a datagram of a denied
// flow, and a run holding a forged datagram, never do, not even their
// allowed datagrams (counted as run collateral).
func TestGatewayRunsNetns(t *testing.T) {
	needNetns(t)
	ipt := iptablesFor(t)
	e := newEnv(t)
	os.WriteFile(filepath.Join(e.dir, "policy.yaml"), []byte("deny:\n  - {proto: udp, dst_port: 5998}\n"), 0o600)
	tp := newTopology(t)
	admin := tp.startOrg(e)
	tp.inDir(tp.r, e.dir, append(admin, "grant", "add", "--device", "gw", "--pairs", "3-7")...)
	tp.in(tp.r, ipt, "-w", "-A", "FORWARD", "-p", "udp", "-m", "multiport", "--ports", "1000,1001", "-j", "NFQUEUE", "--queue-balance", "0:1")
	tp.spawn("gateway", tp.r, e.dir, binary, "gateway", "--ca", "ca/ca.crt", "--cert", "certs/gw.crt", "--key", "certs/gw.key",
		"--keyserver", "10.98.2.1:7443", "--nfqueue", "0,1", "--flow-log", "flows.jsonl", "--flow-idle", "1s", "--policy", "policy.yaml",
		"--metrics-listen", "127.0.0.1:9200", "--status-socket", "gw.sock")
	tp.waitLog("gateway", regexp.MustCompile(`gateway up`))
	tp.startAgents(e, "--status-socket", "srv.sock")

	if out := tp.in(tp.a, "ping", "-c", "3", "-i", "0.3", "-w", "6", "100.64.3.10"); !strings.Contains(out, "3 received") {
		t.Fatalf("ping through the inline gateway:\n%s", out)
	}
	tp.spawn("iperf3-server", tp.b, e.dir, "iperf3", "-s", "-B", "100.64.3.10")
	time.Sleep(300 * time.Millisecond)
	// Paced, so that the far side's socket never overflows: every byte
	// the gateway passes must reach the server agent.
	if out := tp.in(tp.a, "iperf3", "-c", "100.64.3.10", "-n", "30M", "-b", "300M"); !strings.Contains(out, "receiver") {
		t.Fatalf("iperf3 through the gateway:\n%s", out)
	}
	metric := func(name string) float64 { t.Helper(); return tp.metric("127.0.0.1:9200", name) }
	runs, inRuns := metric(`enclave_gateway_runs_total{outcome="passed"}`), metric(`enclave_gateway_run_datagrams_total`)
	if runs == 0 || inRuns < 2*runs {
		t.Fatalf("the transfer crossed the gateway as %v runs of %v datagrams in all", runs, inRuns)
	}
	t.Logf("the transfer crossed the gateway as %v runs, %v datagrams in them (%.1f a run)", runs, inRuns, inRuns/runs)
	if status := tp.inDir(tp.r, e.dir, binary, "status", "--socket", "gw.sock"); !regexp.MustCompile(`runs taken whole: .*passed \d+.* \(\d+ datagrams in them\)`).MatchString(status) ||
		!strings.Contains(status, "runs: whole, cut at the kernel's segment size") {
		t.Errorf("enclave status shows no runs, or not how they are cut:\n%s", status)
	}

	// Runs of our own, on the live SA's pair and generation.
	var st struct {
		Agent struct {
			ServerKeys []struct {
				Pair       string          `json:"pair"`
				Generation keys.Generation `json:"generation"`
				Current    bool            `json:"current"`
			} `json:"server_keys"`
		} `json:"agent"`
	}
	if err := json.Unmarshal([]byte(tp.inDir(tp.b, e.dir, binary, "status", "--socket", "srv.sock", "--json")), &st); err != nil {
		t.Fatal(err)
	}
	var gen keys.Generation
	for _, k := range st.Agent.ServerKeys {
		if k.Pair == "3-7" && k.Current {
			gen = k.Generation
		}
	}
	if gen == 0 {
		t.Fatalf("the server holds no current key of pair 3-7: %+v", st)
	}
	orgText, err := os.ReadFile(filepath.Join(e.dir, "org.key"))
	if err != nil {
		t.Fatal(err)
	}
	org, err := keys.ParseKey(string(orgText))
	if err != nil {
		t.Fatal(err)
	}
	seal := orgtest.Sealer(t, org, keys.VC{Enclave: 3, Peer: 7, Server: 400}, gen, 0x7654)
	from, to := netip.MustParseAddr("100.64.7.99"), netip.MustParseAddr("100.64.3.10")
	allowed := func(i int) []byte { return orgtest.InnerUDP(from, to, 5997, 600, byte(i)) }
	denied := func(i int) []byte { return orgtest.InnerUDP(from, to, 5998, 600, byte(i)) }
	good := [][]byte{seal(allowed(0)), seal(allowed(1)), seal(allowed(2)), seal(allowed(3))}
	mixed := [][]byte{seal(allowed(4)), seal(denied(5)), seal(allowed(6))}
	forged := [][]byte{seal(allowed(7)), seal(allowed(8)), seal(allowed(9))}
	forged[1][packet.HeaderLen+3] ^= 1
	// The attack of issue 30: a run whose real segment size is 230, its
	// bytes showing a PSP header of pair 3-9 (which the gateway cannot
	// read) every 100 bytes, so that a split by its bytes finds opaque
	// datagrams; the kernel delivers, as its second datagram, a valid one
	// of the denied flow. And that datagram alone.
	fake := func(iv uint64) []byte {
		h := packet.Header{NextHeader: packet.NextIPv4, Version: keys.PSPv1, SPI: 0x80000777, IV: iv, VC: keys.VC{Enclave: 3, Peer: 9, Server: 5}}
		b := make([]byte, packet.HeaderLen)
		if err := h.Put(b); err != nil {
			t.Fatal(err)
		}
		return b
	}
	lookalike := func(plant map[int][]byte) []byte {
		b := make([]byte, 230)
		for off, v := range plant {
			copy(b[off:], v)
		}
		return b
	}
	hidden := orgtest.Craft(t, org, gen, keys.VC{Enclave: 3, Peer: 7, Server: 400}, 0x7655, 1, orgtest.InnerUDP(from, to, 5998, 230-packet.Overhead, 'H'),
		map[int][]byte{70: fake(4), 170: fake(5)})
	attack := append(append(lookalike(map[int][]byte{0: fake(1), 100: fake(2), 200: fake(3)}), hidden...), lookalike(map[int][]byte{0: fake(6), 40: fake(7), 140: fake(8)})...)

	deniedBefore := metric(`enclave_gateway_packets_total{kind="data",outcome="denied"}`)
	capture := filepath.Join(e.dir, "runs.pcap")
	tp.spawn("tcpdump", tp.b, e.dir, "tcpdump", "--immediate-mode", "-i", "vB"+strings.TrimPrefix(tp.b, "encB"), "-w", capture, "-U", "udp and src portrange 41001-41005")
	tp.waitLog("tcpdump", regexp.MustCompile(`listening on`))
	netnstest.Do(t, tp.a, func() error {
		for port, run := range map[int][][]byte{41001: good, 41002: mixed, 41003: forged} {
			c, err := net.ListenUDP("udp4", &net.UDPAddr{Port: port})
			if err != nil {
				return err
			}
			err = orgtest.SendRun(c, netip.MustParseAddrPort("10.98.2.2:1000"), run)
			c.Close()
			if err != nil {
				return err
			}
		}
		for port, send := range map[int]func(c *net.UDPConn, to netip.AddrPort) error{
			41004: func(c *net.UDPConn, to netip.AddrPort) error { return orgtest.SendSegmented(c, to, attack, 230) },
			41005: func(c *net.UDPConn, to netip.AddrPort) error { _, err := c.WriteToUDPAddrPort(hidden, to); return err },
		} {
			c, err := net.ListenUDP("udp4", &net.UDPAddr{Port: port})
			if err != nil {
				return err
			}
			err = send(c, netip.MustParseAddrPort("10.98.2.2:1000"))
			c.Close()
			if err != nil {
				return err
			}
		}
		return nil
	})
	time.Sleep(700 * time.Millisecond)
	tp.stop("tcpdump")
	out, _ := exec.Command("tcpdump", "-nr", capture).Output()
	if !strings.Contains(string(out), ".41001 > 10.98.2.2.1000") {
		t.Fatalf("the run of allowed datagrams did not reach the far side:\n%s", out)
	}
	for _, port := range []string{".41002 ", ".41003 ", ".41004 ", ".41005 "} {
		if strings.Contains(string(out), port) {
			t.Fatalf("a datagram of a run the gateway must drop (source port %s) reached the far side:\n%s", port, out)
		}
	}
	if got := metric(`enclave_gateway_runs_total{outcome="dropped"}`); got != 3 {
		t.Errorf("%v runs dropped, want 3 (the mixed, forged and crafted runs)", got)
	}
	if got := metric(`enclave_gateway_packets_total{kind="data",outcome="run_collateral"}`); got != 6 {
		t.Errorf("%v datagrams dropped with their run, want 6 (2 of the mixed run, 2 of the forged one, the 2 lookalikes of the crafted one)", got)
	}
	if got := metric(`enclave_gateway_packets_total{kind="data",outcome="denied"}`); got != deniedBefore+3 {
		t.Errorf("%v datagrams denied, want %v (the mixed run's, the crafted run's hidden one, and that one alone)", got, deniedBefore+3)
	}
	if got := metric(`enclave_gateway_packets_total{kind="data",outcome="forged"}`); got != 1 {
		t.Errorf("%v forged datagrams, want 1", got)
	}

	// Every byte read from the client, and no more, reached the server.
	var rx uint64
	var sv struct {
		Agent struct {
			Peers []struct {
				SAs []struct {
					RxBytes uint64 `json:"rx_bytes"`
				} `json:"sas"`
			} `json:"peers"`
		} `json:"agent"`
	}
	if err := json.Unmarshal([]byte(tp.inDir(tp.b, e.dir, binary, "status", "--socket", "srv.sock", "--json")), &sv); err != nil {
		t.Fatal(err)
	}
	for _, p := range sv.Agent.Peers {
		for _, s := range p.SAs {
			rx += s.RxBytes
		}
	}
	tp.stop("gateway") // writes every flow's line
	var logged int64
	for _, f := range readFlows(t, filepath.Join(e.dir, "flows.jsonl")) {
		if f.Src == "100.64.7.10" {
			logged += f.Bytes
		}
	}
	if logged != int64(rx) {
		snmp := tp.in(tp.b, "cat", "/proc/net/snmp")
		t.Fatalf("the gateway's flow log counts %d bytes from the client, the server agent received %d\n%s", logged, rx, grepLines(snmp, "Udp:"))
	}
	t.Logf("flow log and server agree: %d bytes", rx)
}
