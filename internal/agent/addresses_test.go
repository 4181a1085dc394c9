package agent

import (
	"net/netip"
	"testing"
	"time"
)

// TestOwnAddrs: a path entry counts as sent to this server only when it
// names the control port at an address of the server (the listener's, any
// of the host's for a wildcard listener) or a configured public endpoint.
func TestOwnAddrs(t *testing.T) {
	now := func() time.Time { return time.Unix(1e9, 0) }
	ap := netip.MustParseAddrPort
	specific := newOwnAddrs(ap("127.0.0.1:1001"), nil, now)
	wildcard := newOwnAddrs(ap("0.0.0.0:1001"), []netip.AddrPort{ap("203.0.113.5:4001")}, now)
	cases := []struct {
		name string
		o    *ownAddrs
		to   netip.AddrPort
		want bool
	}{
		{"the listener's address", specific, ap("127.0.0.1:1001"), true},
		{"IPv4-mapped", specific, ap("[::ffff:127.0.0.1]:1001"), true},
		{"another port", specific, ap("127.0.0.1:1002"), false},
		{"another address", specific, ap("127.0.0.2:1001"), false},
		{"no destination", specific, netip.AddrPort{}, false},
		{"wildcard: a host address", wildcard, ap("127.0.0.1:1001"), true},
		{"wildcard: not a host address", wildcard, ap("192.0.2.77:1001"), false},
		{"wildcard: another port", wildcard, ap("127.0.0.1:1000"), false},
		{"public endpoint", wildcard, ap("203.0.113.5:4001"), true},
		{"public address, other port", wildcard, ap("203.0.113.5:1001"), false},
	}
	for _, c := range cases {
		if got := c.o.addressed(c.to); got != c.want {
			t.Errorf("%s: addressed(%v) = %v, want %v", c.name, c.to, got, c.want)
		}
	}
}

// TestPublicEndpointChecked: a public endpoint whose control port would
// not exist is a configuration error.
func TestPublicEndpointChecked(t *testing.T) {
	o := newOrg(t, 2*time.Second)
	creds := o.Credentials(serverID("web1", 3, 258, "100.64.3.1/16"))
	for _, p := range []string{"203.0.113.5:0", "203.0.113.5:65535"} {
		_, err := New(Config{Credentials: creds, Listen: netip.MustParseAddrPort("127.0.0.1:0"), Public: []netip.AddrPort{netip.MustParseAddrPort(p)}})
		if err == nil {
			t.Errorf("public endpoint %s accepted", p)
		}
	}
}
