//go:build linux

package gateway

import (
	"encoding/binary"
	"net"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"github.com/enclavekeys/enclave/internal/control"
)

// TestRelayAmplification (issue 30, item 3): towards an address that
// never answered as a server, a --no-derive relay sends at most three
// times the bytes its source sent: for one 37-byte junk initiation (it
// once made 1,790 bytes arrive: a tagged initiation and two session
// initiations) and for a burst of 500. Bytes are counted at the address
// the initiations name, a socket of the test's own on 127.0.0.7.
func TestRelayAmplification(t *testing.T) {
	l := newLab(t)
	l.grant("legacy", [2]uint32{1, 2})
	gw := l.gateway("legacy", 1, gwOpts{noDerive: true})
	victim, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 7)})
	if err != nil {
		t.Skipf("no 127.0.0.7 here: %v", err)
	}
	defer victim.Close()
	var got atomic.Int64
	go func() {
		buf := make([]byte, 65535)
		for {
			n, err := victim.Read(buf)
			if err != nil {
				return
			}
			got.Add(int64(n))
		}
	}()
	src := loopbackConn(t)
	ctrl := netip.AddrPortFrom(gw.RelayAddr().Addr(), gw.RelayAddr().Port()+1)
	junk := func(sender uint32) []byte {
		// A 37-byte Initiation that parses: 10 bytes of "noise".
		m := []byte{0x45, 1, byte(control.TypeInitiation), 0, 0, 0, 0, 0, 0, 10}
		binary.BigEndian.PutUint32(m[4:8], sender)
		m = append(m, make([]byte, 10+control.MACLen)...)
		m = append(m, 0) // an empty path record
		if _, err := control.ParseInitiation(m); err != nil || len(m) != 37 {
			t.Fatalf("the junk initiation does not parse (%d bytes): %v", len(m), err)
		}
		f := make([]byte, control.MaxRelayHeader+len(m))
		hl, err := control.PutRelayHeader(f, victim.LocalAddr().(*net.UDPAddr).AddrPort())
		if err != nil {
			t.Fatal(err)
		}
		return f[:hl+copy(f[hl:], m)]
	}
	var sent int64
	measure := func(name string, n int) {
		t.Helper()
		got.Store(0)
		sent = 0
		for i := range n {
			f := junk(uint32(1000 + i))
			if _, err := src.WriteToUDPAddrPort(f, ctrl); err != nil {
				t.Fatal(err)
			}
			sent += int64(len(f))
			if i%50 == 49 {
				time.Sleep(5 * time.Millisecond) // no loss on loopback
			}
		}
		time.Sleep(3500 * time.Millisecond) // the session's retransmits come after 1 and 2 s
		ratio := float64(got.Load()) / float64(sent)
		t.Logf("%s: sent %d bytes, %d arrived at the address named: x%.2f", name, sent, got.Load(), ratio)
		if ratio > ampFactor {
			t.Errorf("%s: x%.2f towards an address that never answered, more than x%d", name, ratio, ampFactor)
		}
	}
	measure("one junk initiation", 1)
	measure("a burst of 500", 500)
	reg := gw.Metrics().Registry()
	if n := counter(t, reg, "enclave_gateway_packets_total", map[string]string{"kind": "control", "outcome": "untagged_amplification"}); n == 0 {
		t.Error("no handshake was passed untagged for the limit")
	}
}

// TestResponseFlood (attacker review): junk Responses from one source
// cost the gateway at most its share of signatures; past it they pass
// untagged (no one reads a Response's path record), never dropped, and
// the gateway signs nothing for them.
func TestResponseFlood(t *testing.T) {
	l := newLab(t)
	gw := l.gateway("gw1", 1, gwOpts{})
	src, dst := netip.MustParseAddrPort("192.0.2.1:1001"), netip.MustParseAddrPort("192.0.2.2:1001")
	gw.amp.prove(dst.Addr())
	// A Response that parses: header, receiver index, an empty Noise
	// message and path record.
	resp := []byte{0x45, 1, byte(control.TypeResponse), 0, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0}
	if _, err := control.ParseResponse(resp); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 0, 4096)
	for range 1000 {
		if _, pass := gw.onControl(resp, buf, src, dst); !pass {
			t.Fatal("a Response was dropped")
		}
	}
	reg := gw.Metrics().Registry()
	tagged := counter(t, reg, "enclave_gateway_packets_total", map[string]string{"kind": "control", "outcome": "tagged"})
	limited := counter(t, reg, "enclave_gateway_packets_total", map[string]string{"kind": "control", "outcome": "rate_limited"})
	if tagged > tagBurst+tagRate || limited < 1000-tagBurst-tagRate {
		t.Fatalf("%v Responses tagged (signed), %v passed over the budget, of 1000 from one source", tagged, limited)
	}
}

// TestUnprovenSessionsPerSource (attacker review): one source's need-key
// initiations towards endpoints never heard answer open at most its own
// share of sessions (5, then 2 a second), so the gateway-wide budget is
// left for the others'.
func TestUnprovenSessionsPerSource(t *testing.T) {
	l := newLab(t)
	gw := l.gateway("legacy", 1, gwOpts{noDerive: true})
	gw.amp.prove(netip.MustParseAddr("127.0.0.1"))
	attacker, other := netip.MustParseAddr("192.0.2.66"), netip.MustParseAddr("192.0.2.77")
	for i := range 100 {
		gw.servers.ensure(gw.Gateway, netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(30000+i)), true, attacker)
	}
	reg := gw.Metrics().Registry()
	if n := counter(t, reg, "enclave_gateway_sessions_total", map[string]string{"outcome": "unproven_source_limited"}); n < 100-unprovenSourceBurst-2 {
		t.Fatalf("%v of one source's 100 sessions refused", n)
	}
	gw.servers.mu.Lock()
	opened := len(gw.servers.byEP)
	gw.servers.mu.Unlock()
	gw.servers.ensure(gw.Gateway, netip.MustParseAddrPort("127.0.0.1:31000"), true, other)
	gw.servers.mu.Lock()
	after := len(gw.servers.byEP)
	gw.servers.mu.Unlock()
	if opened > unprovenSourceBurst+2 || after != opened+1 {
		t.Fatalf("one source opened %d sessions; another source then %d", opened, after-opened)
	}
}
