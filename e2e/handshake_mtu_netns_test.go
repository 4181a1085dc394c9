//go:build linux

package e2e

import (
	be "encoding/binary"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/google/gopacket/pcapgo"
)

// TestJoinedHostsThroughInlineGateway (issue 30, item 4): hosts that
// joined (their certificates carry their issuing CA's: a 1,131-byte
// initiation) talk through an inline gateway on links of MTU 1500. The
// gateway's entry would take the initiation to about 1,670 bytes, which
// the router drops (DF set: "need to frag"), so it goes apart and the
// initiation carries its stub. Handshakes and the rekeys a rotation
// brings succeed, and no handshake datagram on the server's link is
// larger than 1,280 bytes (IPv6's minimum MTU) or fragmented.
func TestJoinedHostsThroughInlineGateway(t *testing.T) {
	needNetns(t)
	ipt := iptablesFor(t)
	e := newEnv(t)
	tp := newTopology(t)
	e.issue("gw", "gateway", "--enclave", "7")
	admin, token, fp := tp.startJoinOrg(e, []string{"device", "add", "--name", "gw", "--role", "gateway", "--enclave", "7"}, []string{"grant", "add", "--device", "gw", "--pairs", "3-7"})
	tp.in(tp.r, ipt, "-w", "-A", "FORWARD", "-p", "udp", "-m", "multiport", "--ports", "1000,1001", "-j", "NFQUEUE", "--queue-balance", "0:1")
	tp.spawn("gateway", tp.r, e.dir, binary, "gateway", "--ca", "ca/ca.crt", "--cert", "certs/gw.crt", "--key", "certs/gw.key",
		"--keyserver", "10.98.2.1:7443", "--nfqueue", "0,1", "--metrics-listen", "127.0.0.1:9200")
	tp.waitLog("gateway", regexp.MustCompile(`gateway up`))

	capture := filepath.Join(e.dir, "handshakes.pcap")
	tp.spawn("tcpdump", tp.b, e.dir, "tcpdump", "--immediate-mode", "-i", tp.underlayB(), "-w", capture, "-U", "udp port 1001 or (ip[6:2] & 0x3fff != 0)")
	tp.waitLog("tcpdump", regexp.MustCompile(`listening on`))

	tp.joinHost(e, tp.b, "web", "10.98.2.2", token("--name", "web", "--role", "server", "--enclave", "3", "--server-id", "401", "--ip", "100.64.3.20/16"), fp)
	tp.joinHost(e, tp.a, "desk", "10.98.1.2", token("--name", "desk", "--role", "client", "--enclave", "7", "--ip", "100.64.7.20/16"), fp)
	for _, mtu := range []string{tp.in(tp.a, "cat", "/sys/class/net/"+tp.underlayA()+"/mtu"), tp.in(tp.b, "cat", "/sys/class/net/"+tp.underlayB()+"/mtu")} {
		if strings.TrimSpace(mtu) != "1500" {
			t.Fatalf("a link's MTU is %s, the test wants 1500", mtu)
		}
	}
	ping := func(what string) {
		t.Helper()
		out, err := exec.Command("ip", "netns", "exec", tp.a, "ping", "-c", "3", "-i", "0.3", "-w", "10", "100.64.3.20").CombinedOutput()
		if err != nil || !strings.Contains(string(out), "3 received") {
			t.Fatalf("%s: ping through the inline gateway:\n%s\n%s", what, out, tp.logs["desk"])
		}
	}
	metric := func(name string) float64 { t.Helper(); return tp.metric("127.0.0.1:9200", name) }
	ping("the first handshake")
	apart := metric(`enclave_gateway_packets_total{kind="control",outcome="tagged_apart"}`)
	if apart < 1 {
		t.Fatalf("%v entries sent apart", apart)
	}
	// Two rotations (issue 32: through two): each time the server learns
	// the new generation and asks the client to move; the new handshake
	// crosses the gateway the same way.
	for i := 1; i <= 2; i++ {
		tp.inDir(tp.r, e.dir, append(admin, "rotate", "--pair", "3-7", "--now")...)
		deadline := time.Now().Add(20 * time.Second)
		for metric(`enclave_gateway_packets_total{kind="control",outcome="tagged_apart"}`) <= apart {
			if time.Now().After(deadline) {
				t.Fatalf("no handshake crossed the gateway after rotation %d:\n%s", i, tp.logs["desk"])
			}
			exec.Command("ip", "netns", "exec", tp.a, "ping", "-c", "1", "-W", "1", "100.64.3.20").Run()
		}
		apart = metric(`enclave_gateway_packets_total{kind="control",outcome="tagged_apart"}`)
		ping(fmt.Sprintf("after rotation %d", i))
	}
	time.Sleep(300 * time.Millisecond)
	tp.stop("tcpdump")

	// Every handshake datagram that reached the server's link.
	f, err := os.Open(capture)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	r, err := pcapgo.NewReader(f)
	if err != nil {
		t.Fatal(err)
	}
	largest, initiations := 0, 0
	for {
		data, _, err := r.ReadPacketData()
		if err != nil {
			break
		}
		if len(data) < 14+20+8+3 || be.BigEndian.Uint16(data[12:]) != 0x0800 {
			continue
		}
		ip := data[14:]
		if be.BigEndian.Uint16(ip[6:])&0x3fff != 0 {
			t.Fatalf("a fragment crossed to the server: % x", ip[:20])
		}
		total := int(be.BigEndian.Uint16(ip[2:]))
		udp := ip[int(ip[0]&0x0f)*4:]
		if be.BigEndian.Uint16(udp[2:]) != 1001 || udp[8] != 0x45 {
			continue
		}
		if udp[10] == 1 { // an Initiation
			initiations++
			largest = max(largest, total)
		}
		if total > 1280 {
			t.Errorf("a handshake datagram of %d bytes reached the server", total)
		}
	}
	t.Logf("%d initiations reached the server, the largest %d bytes (IP); entries sent apart: %v", initiations, largest,
		metric(`enclave_gateway_packets_total{kind="control",outcome="tagged_apart"}`))
	if initiations < 2 || largest > 1280 {
		t.Fatalf("%d initiations, the largest %d bytes", initiations, largest)
	}
}
