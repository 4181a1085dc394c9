package gateway

import (
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/control"
	"github.com/enclavekeys/enclave/internal/handshake"
)

// TestReplayedTagDoesNotPlace (issue 20, item 11): a client whose
// certificate names no enclave has the open relay in enclave 1 tag its
// initiation and forward it to an address of its own, then sends the
// tagged initiation straight to the server in enclave 2. Without the
// destination in the signed entry the server took the relay's entry and
// placed the client in enclave 1 (pair 1-2 is allowed) although its
// packets never crossed the relay on their way to the server; now the
// entry is counted as misdirected and the client is refused. The same
// initiation relayed to the server itself is served: the entry was made
// for this server.
func TestReplayedTagDoesNotPlace(t *testing.T) {
	l := newLab(t)
	gw := l.gateway("gw1", 1, gwOpts{}) // open: it forwards anywhere
	creds := l.o.Credentials(ca.Identity{Name: "nomad", Role: ca.RoleClient, Overlay: netip.MustParsePrefix("100.64.1.9/16")})
	server := netip.AddrPortFrom(l.srv2.DataPort().Addr(), l.srv2.DataPort().Port()+1)

	// The attacker's control socket (its data port is the one before,
	// as the relay takes it) and a sink that receives what the relay
	// forwards.
	ctrl := listenPair(t)
	sink, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.MustParseAddrPort("127.0.0.1:0")))
	if err != nil {
		t.Fatal(err)
	}
	defer sink.Close()
	sinkAddr := sink.LocalAddr().(*net.UDPAddr).AddrPort()
	relayCtrl := netip.AddrPortFrom(gw.RelayAddr().Addr(), gw.RelayAddr().Port()+1)

	init, msg, err := handshake.Initiate(creds, 0x5151, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	framed := make([]byte, control.MaxRelayHeader, control.MaxRelayHeader+len(msg))
	hl, err := control.PutRelayHeader(framed, sinkAddr)
	if err != nil {
		t.Fatal(err)
	}
	framed = append(framed[:hl], msg...)
	if _, err := ctrl.WriteToUDPAddrPort(framed, relayCtrl); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 65535)
	sink.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, _, err := sink.ReadFromUDPAddrPort(buf)
	if err != nil {
		t.Fatalf("the relay forwarded nothing to the attacker's sink: %v", err)
	}
	tagged := append([]byte(nil), buf[:n]...)
	in, err := control.ParseInitiation(tagged)
	if err != nil || len(in.Path.Entries) != 1 || !in.Path.Entries[0].Signed() {
		t.Fatalf("the relay did not tag the initiation (%v, %d entries)", err, len(in.Path.Entries))
	}

	// The replay, straight to the server.
	if _, err := ctrl.WriteToUDPAddrPort(tagged, server); err != nil {
		t.Fatal(err)
	}
	ctrl.SetReadDeadline(time.Now().Add(2 * time.Second))
	if n, _, err := ctrl.ReadFromUDPAddrPort(buf); err == nil {
		if res, err := init.Complete(buf[:n], time.Now()); err == nil && res.Payload.Grant != nil {
			t.Fatalf("the server granted an SA on a replayed tag: pair %d-%d", res.Payload.Grant.Enclave, res.Payload.Grant.Peer)
		}
	}
	waitFor(t, 5*time.Second, "misdirected entry counted", func() bool {
		return counter(t, l.srv2.Metrics().Gatherer(), "enclave_agent_discovery_disagreements_total", map[string]string{"kind": "misdirected"}) == 1
	})
	if n := counter(t, l.srv2.Metrics().Gatherer(), "enclave_agent_handshakes_total", map[string]string{"side": "responder", "result": "refused", "reason": "enclave"}); n != 1 {
		t.Fatalf("%v refusals for want of an enclave, want 1", n)
	}

	// The honest path: the same client through the relay to the server.
	via := l.agentWith(creds, ca.Identity{Name: "nomad", Role: ca.RoleClient}, l.routes(), gw.RelayAddr())
	mustExchange(t, via, "100.64.2.1:7", 500)
}

// listenPair opens a control socket on loopback whose port less one is
// free too (the relay takes a control datagram's data port to be its
// source port less one).
func listenPair(t *testing.T) *net.UDPConn {
	t.Helper()
	for try := 0; try < 50; try++ {
		d, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.MustParseAddrPort("127.0.0.1:0")))
		if err != nil {
			t.Fatal(err)
		}
		p := d.LocalAddr().(*net.UDPAddr).AddrPort().Port()
		if p == 65535 {
			d.Close()
			continue
		}
		c, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(netip.MustParseAddrPort("127.0.0.1:0").Addr(), p+1)))
		if err != nil {
			d.Close()
			continue
		}
		t.Cleanup(func() { d.Close(); c.Close() })
		return c
	}
	t.Fatal("no pair of free ports")
	return nil
}
