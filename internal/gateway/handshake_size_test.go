package gateway

import (
	"context"
	"net/netip"
	"testing"
	"time"

	"github.com/enclavekeys/enclave/internal/api"
	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/control"
	"github.com/enclavekeys/enclave/internal/handshake"
)

// TestTaggedWithinMTU (issue 30, item 4): whatever the initiation, a
// gateway never makes it larger than a 1280-byte IPv6 packet holds. A
// joined host's initiation (its certificate carries its issuing CA's) is
// too large for a gateway's entry in its path record: the entry goes
// apart (a TypeEntry message ahead of it) and the initiation carries its
// stub; the next gateway's entry goes apart too; one too large even for
// a stub passes untagged.
func TestTaggedWithinMTU(t *testing.T) {
	l := newLab(t)
	l.grant("gw1", [2]uint32{1, 2})
	gw := l.gateway("gw1", 1, gwOpts{noDerive: true})
	gw2 := l.gateway("gw2", 2, gwOpts{})
	to := netip.MustParseAddrPort("127.0.0.1:1001")
	gw.amp.prove(to.Addr()) // no amplification limit here: sizes only
	gw2.amp.prove(to.Addr())
	id := ca.Identity{Name: "joined", Role: ca.RoleClient, Enclave: 1, Overlay: netip.MustParsePrefix("100.64.1.9/16")}
	for _, c := range []struct {
		name   string
		creds  *handshake.Credentials
		inband int // entries that fit in the record
	}{
		{"org-CA certificate", l.o.Credentials(id), 1},
		{"joined host (with its issuing CA)", l.o.JoinedCredentials(id), 0},
	} {
		_, msg, err := handshake.Initiate(c.creds, 7, time.Now())
		if err != nil {
			t.Fatal(err)
		}
		out := msg
		apart := 0
		for i, g := range []*testGateway{gw, gw2} {
			tagged, sep, _, err := g.tag(out, make([]byte, 0, 4096), control.TypeInitiation, to)
			if err != nil {
				t.Fatalf("%s: gateway %d: %v", c.name, i+1, err)
			}
			if len(tagged) > control.MaxHandshake {
				t.Fatalf("%s: gateway %d made it %d bytes, more than %d", c.name, i+1, len(tagged), control.MaxHandshake)
			}
			if sep != nil {
				apart++
				if _, err := control.ParseEntryMessage(sep); err != nil {
					t.Fatal(err)
				}
			}
			out = tagged
		}
		t.Logf("%s: initiation %d bytes, %d after two gateways, %d entries apart", c.name, len(msg), len(out), apart)
		if want := 2 - c.inband; apart != want {
			t.Errorf("%s: %d entries apart, want %d", c.name, apart, want)
		}
	}
	big := make([]byte, control.MaxHandshake-control.StubLen+1-8-2-control.MACLen-1)
	msg, _, err := control.AppendInitiation(nil, 9, big)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, _, err := gw.tag(msg, nil, control.TypeInitiation, to); err != errOversize {
		t.Fatalf("an initiation of %d bytes: %v, want errOversize", len(msg), err)
	}
}

// TestJoinedHostThroughRelay (issue 30, item 4): a joined host (its
// certificate with its issuing CA's) through a relay that cannot derive:
// its entry travels apart, the server verifies it and delivers the SA's
// keys, the relay reads the SA; after a rotation the client's new SA is
// made the same way and read too.
func TestJoinedHostThroughRelay(t *testing.T) {
	l := newLab(t)
	l.grant("legacy", [2]uint32{1, 2})
	gw := l.gateway("legacy", 1, gwOpts{noDerive: true})
	id := ca.Identity{Name: "joined", Role: ca.RoleClient, Enclave: 1, Overlay: netip.MustParsePrefix("100.64.1.9/16")}
	cli := l.agentWith(l.o.JoinedCredentials(id), id, l.routes(), gw.RelayAddr())
	reg := gw.Metrics().Registry()
	mustExchange(t, cli, "100.64.2.1:7", 5000)
	if n := counter(t, reg, "enclave_gateway_packets_total", map[string]string{"kind": "control", "outcome": "tagged_apart"}); n < 1 {
		t.Fatalf("%v entries sent apart", n)
	}
	delivered := counter(t, reg, "enclave_gateway_key_exchange_total", map[string]string{"outcome": "delivered"})
	if delivered < 1 || counter(t, reg, "enclave_gateway_pair_packets_total", map[string]string{"pair": "1-2", "outcome": "read"}) == 0 {
		t.Fatalf("the relay was not given the SA's keys (%v delivered) or read nothing", delivered)
	}
	r, err := l.o.Admin.Rotate(context.Background(), &api.RotateRequest{Pair: &api.Pair{A: 1, B: 2}, Now: true})
	if err != nil || r.Rotations[0].Outcome != "rotated" {
		t.Fatalf("rotate: %+v %v", r, err)
	}
	waitFor(t, 10*time.Second, "the rekeyed SA's keys delivered", func() bool {
		mustExchange(t, cli, "100.64.2.1:7", 500)
		return counter(t, reg, "enclave_gateway_key_exchange_total", map[string]string{"outcome": "delivered"}) > delivered
	})
	if n := counter(t, reg, "enclave_gateway_pair_packets_total", map[string]string{"pair": "1-2", "outcome": "opaque"}); n != 0 {
		t.Fatalf("%v packets of pair 1-2 passed unread", n)
	}
}
