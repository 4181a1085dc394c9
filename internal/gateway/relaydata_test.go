//go:build linux

package gateway

import (
	"bytes"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/enclavekeys/enclave/internal/batch"
	"github.com/enclavekeys/enclave/internal/control"
	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/orgtest"
	"github.com/enclavekeys/enclave/internal/packet"
)

// TestRelayRuns: a run of framed datagrams an agent sends as one message
// crosses the relay as one message each way, judged datagram by
// datagram. On real loopback sockets with segmentation offload and
// receive coalescing: the agent's run of six, one of a denied flow,
// reaches the peer as a run of the five others, in order; the peer's run
// of three answers reaches the agent as one run, framed with its origin.
func TestRelayRuns(t *testing.T) {
	l := newLab(t)
	l.grant("gw1", [2]uint32{1, 2})
	gw := l.gateway("gw1", 1, gwOpts{policy: "deny:\n  - {proto: udp, dst_port: 5998}\n"})
	relay := gw.RelayAddr()

	agentSock, peerSock := loopbackConn(t), loopbackConn(t)
	peer := peerSock.LocalAddr().(*net.UDPAddr).AddrPort()
	vc := keys.VC{Enclave: 2, Peer: 1, Server: 20}
	up, down := orgtest.Sealer(t, l.o.OrgKey, vc, 1, 0x11), orgtest.Sealer(t, l.o.OrgKey, vc, 1, 0x12)
	cli, srv := netip.MustParseAddr("100.64.1.9"), netip.MustParseAddr("100.64.2.1")

	var sent [][]byte
	var framed [][]byte
	for i := range 6 {
		port := uint16(5997)
		if i == 3 {
			port = 5998
		}
		d := up(orgtest.InnerUDP(cli, srv, port, 500, byte(i)))
		f := make([]byte, control.MaxRelayHeader+len(d))
		hl, err := control.PutRelayHeader(f, peer)
		if err != nil {
			t.Fatal(err)
		}
		framed = append(framed, f[:hl+copy(f[hl:], d)])
		if i != 3 {
			sent = append(sent, d)
		}
	}
	if err := orgtest.SendRun(agentSock, relay, framed); err != nil {
		t.Fatal(err)
	}
	got, from, runs := readRuns(t, peerSock, len(sent))
	for k := range sent {
		if !bytes.Equal(got[k], sent[k]) {
			t.Fatalf("datagram %d at the peer differs", k)
		}
	}
	if runs == 0 {
		t.Fatalf("the five datagrams reached the peer one by one, not as a run")
	}

	// The answers, as one run to the agent's upstream socket.
	var answers [][]byte
	for i := range 3 {
		answers = append(answers, down(orgtest.InnerUDP(srv, cli, 40000, 500, byte(i))))
	}
	if err := orgtest.SendRun(peerSock, from, answers); err != nil {
		t.Fatal(err)
	}
	back, _, backRuns := readRuns(t, agentSock, len(answers))
	for k := range answers {
		origin, hl, err := control.ParseRelayHeader(back[k])
		if err != nil || origin != peer || !bytes.Equal(back[k][hl:], answers[k]) {
			t.Fatalf("answer %d at the agent: origin %v, %v", k, origin, err)
		}
	}
	if backRuns == 0 {
		t.Fatalf("the answers reached the agent one by one, not as a run")
	}
	reg := gw.Metrics().Registry()
	for _, c := range []struct {
		name   string
		labels map[string]string
		want   float64
	}{
		{"enclave_gateway_runs_total", map[string]string{"outcome": "dropped_datagrams"}, 1},
		{"enclave_gateway_runs_total", map[string]string{"outcome": "passed"}, 1},
		{"enclave_gateway_packets_total", map[string]string{"kind": "data", "outcome": "denied"}, 1},
		{"enclave_gateway_packets_total", map[string]string{"kind": "data", "outcome": "read"}, 8},
	} {
		if got := counter(t, reg, c.name, c.labels); got != c.want {
			t.Errorf("%s%v = %v, want %v", c.name, c.labels, got, c.want)
		}
	}
}

func loopbackConn(t *testing.T) *net.UDPConn {
	t.Helper()
	c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// readRuns reads n datagrams on c with receive coalescing, and returns
// them, the source of the last, and how many messages were runs.
func readRuns(t *testing.T, c *net.UDPConn, n int) ([][]byte, netip.AddrPort, int) {
	t.Helper()
	r, err := batch.New(c, 4)
	if err != nil {
		t.Fatal(err)
	}
	bufs := [][]byte{make([]byte, 65535), make([]byte, 65535), make([]byte, 65535), make([]byte, 65535)}
	sizes, segs, srcs := make([]int, 4), make([]int, 4), make([]netip.AddrPort, 4)
	var got [][]byte
	var from netip.AddrPort
	runs := 0
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	defer c.SetReadDeadline(time.Time{})
	for len(got) < n {
		m, err := r.Read(bufs, sizes, segs, srcs)
		if err != nil {
			t.Fatalf("after %d of %d datagrams: %v", len(got), n, err)
		}
		for i := 0; i < m; i++ {
			msg, seg := bufs[i][:sizes[i]], segs[i]
			if seg > 0 && seg < len(msg) {
				runs++
			} else {
				seg = len(msg)
			}
			for off := 0; off < len(msg); off += seg {
				got = append(got, bytes.Clone(msg[off:min(off+seg, len(msg))]))
			}
			from = srcs[i]
		}
	}
	if len(got) != n {
		t.Fatalf("%d datagrams, want %d", len(got), n)
	}
	return got, from, runs
}

// TestRelayCutsAtKernelSize: the relay cuts what it reads at the segment
// size the kernel's receive coalescing reports, never at boundaries the
// bytes suggest. A key holder sends a run of three framed 230-byte
// datagrams (UDP_SEGMENT of the framed size) whose bytes show framings
// and pair-3-9 PSP headers every 100 bytes, the second datagram a valid
// one of a denied flow: the peer gets exactly the two others, as sent,
// and the denial is counted.
func TestRelayCutsAtKernelSize(t *testing.T) {
	l := newLab(t)
	l.grant("gw1", [2]uint32{1, 2})
	gw := l.gateway("gw1", 1, gwOpts{policy: "deny:\n  - {proto: udp, dst_port: 5998}\n"})
	agentSock, peerSock := loopbackConn(t), loopbackConn(t)
	peer := peerSock.LocalAddr().(*net.UDPAddr).AddrPort()
	frame := func(d []byte) []byte {
		f := make([]byte, control.MaxRelayHeader+len(d))
		hl, err := control.PutRelayHeader(f, peer)
		if err != nil {
			t.Fatal(err)
		}
		return f[:hl+copy(f[hl:], d)]
	}
	fakeFrame := frame(fakeHeader(9))[:control.MaxRelayHeader]
	cli, srv := netip.MustParseAddr("100.64.1.9"), netip.MustParseAddr("100.64.2.1")
	hidden := orgtest.Craft(t, l.o.OrgKey, 1, keys.VC{Enclave: 2, Peer: 1, Server: 20}, 0x31, 1, orgtest.InnerUDP(cli, srv, 5998, 230-packet.Overhead, 'H'),
		map[int][]byte{70: fakeHeader(4), 170: fakeHeader(5)})
	look0 := lookalike(230, map[int][]byte{0: fakeHeader(1), 100: fakeFrame, 200: fakeHeader(3)})
	look2 := lookalike(230, map[int][]byte{0: fakeHeader(6), 40: fakeFrame, 140: fakeHeader(8)})
	run := bytes.Join([][]byte{frame(look0), frame(hidden), frame(look2)}, nil)
	if err := orgtest.SendSegmented(agentSock, gw.RelayAddr(), run, len(run)/3); err != nil {
		t.Fatal(err)
	}
	got, _, _ := readRuns(t, peerSock, 2)
	if !bytes.Equal(got[0], look0) || !bytes.Equal(got[1], look2) {
		t.Fatalf("the peer got %d and %d bytes, not the two datagrams around the denied one", len(got[0]), len(got[1]))
	}
	peerSock.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	if n, err := peerSock.Read(make([]byte, 2000)); err == nil {
		t.Fatalf("a third datagram of %d bytes reached the peer", n)
	}
	if got := counter(t, gw.Metrics().Registry(), "enclave_gateway_packets_total", map[string]string{"kind": "data", "outcome": "denied"}); got != 1 {
		t.Errorf("%v denied, want 1", got)
	}
	// It came as one coalesced run, cut by the kernel's size.
	if got := counter(t, gw.Metrics().Registry(), "enclave_gateway_runs_total", map[string]string{"outcome": "dropped_datagrams"}); got != 1 {
		t.Errorf("%v runs with datagrams dropped, want 1: the relay did not take the run whole", got)
	}
}
