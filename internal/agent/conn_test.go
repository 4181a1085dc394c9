package agent

import (
	"net/netip"
	"testing"
	"time"
)

// TestOneWaitingSAPerClient: a server's first SA with a client is the
// route; each newer grant waits for the client's first packet, and a
// newer grant ends the one waiting before it (the client never used it),
// so that handshakes without traffic do not pile up SAs. Once the client
// sends on the newest, it becomes the route and the old one drains.
func TestOneWaitingSAPerClient(t *testing.T) {
	now := time.Now()
	tb := newTables(0, time.Minute)
	sa := func(i int) *conn {
		c := fakeSA(i, 1, true, now.Add(time.Hour), netip.AddrPort{})
		return c
	}
	first := sa(0)
	if n := tb.add(first, now); n != 0 || tb.route[first.overlay] != first {
		t.Fatalf("first SA: superseded %d, route %v", n, tb.route[first.overlay] == first)
	}
	var last *conn
	for i := 1; i <= 50; i++ {
		c := sa(i)
		n := tb.add(c, now)
		if want := min(i-1, 1); n != want {
			t.Fatalf("grant %d ended %d waiting SAs, want %d", i, n, want)
		}
		last = c
	}
	if got := len(tb.byPeer[first.overlay]); got != 2 || len(tb.bySPI) != 2 || len(tb.bySession) != 2 || len(tb.due) != 2 {
		t.Fatalf("after 50 grants without traffic the client holds %d SAs (%d, %d, %d in the other indexes), want 2", got, len(tb.bySPI), len(tb.bySession), len(tb.due))
	}
	if tb.route[first.overlay] != first || last.closed.Load() {
		t.Fatal("the route moved, or the newest grant was ended")
	}
	// Its first packet on the newest: the route; the first drains.
	tb.promote(last, now)
	if tb.route[first.overlay] != last || !first.expires.Equal(now.Add(drain)) {
		t.Fatalf("after the client's packet: route is the newest %v, first ends %v", tb.route[first.overlay] == last, first.expires.Sub(now))
	}
	// The next grant waits; the confirmed route is not ended by it.
	if n := tb.add(sa(99), now); n != 0 || last.closed.Load() {
		t.Fatalf("a grant after the route was confirmed ended %d SAs", n)
	}
}

// TestRoamControl: a server SA's control endpoint stays where the
// handshake came from when the first data packet replaces the data
// endpoint's guess (a NAT maps the ports apart), and moves with the data,
// keeping its offset, when the client roams later (a restarted relay).
func TestRoamControl(t *testing.T) {
	ap := netip.MustParseAddrPort
	for _, tc := range []struct {
		name           string
		ctrl, old, now netip.AddrPort
		want           netip.AddrPort
	}{
		{"relay pair", ap("127.0.0.1:4001"), ap("127.0.0.1:4000"), ap("127.0.0.1:5000"), ap("127.0.0.1:5001")},
		{"new address", ap("192.0.2.1:40001"), ap("192.0.2.1:40000"), ap("198.51.100.7:1000"), ap("198.51.100.7:1001")},
		{"apart ports", ap("192.0.2.1:52333"), ap("192.0.2.1:40001"), ap("192.0.2.1:40005"), ap("192.0.2.1:52337")},
		{"out of range", ap("192.0.2.1:65535"), ap("192.0.2.1:1"), ap("192.0.2.1:2000"), ap("192.0.2.1:2001")},
	} {
		c := &conn{}
		c.setControl(tc.ctrl)
		c.roamControl(tc.old, tc.now)
		if got := c.controlEndpoint(); got != tc.want {
			t.Errorf("%s: control endpoint %v, want %v", tc.name, got, tc.want)
		}
	}
}
