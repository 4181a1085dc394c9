package gateway

import (
	"context"
	"crypto/ed25519"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/enclavekeys/enclave/internal/ca"
)

// TestReadsOnlyGrantedPairs: a gateway granted (1,2) reads the traffic of
// a client in enclave 1 with a server in enclave 2, and not with one in
// enclave 3, which passes untouched and counted as opaque; its flow log
// names only the inner flows it read, and its decrypted capture holds
// them.
func TestReadsOnlyGrantedPairs(t *testing.T) {
	l := newLab(t)
	l.grant("gw1", [2]uint32{1, 2})
	gw := l.gateway("gw1", 1, gwOpts{flowLog: true, capture: true})
	cli := l.client("cli", 1, "100.64.1.1/16", gw.RelayAddr())
	mustExchange(t, cli, "100.64.2.1:7", 20000)
	mustExchange(t, cli, "100.64.3.1:7", 20000)

	reg := gw.Metrics().Registry()
	read12 := counter(t, reg, "enclave_gateway_pair_packets_total", map[string]string{"pair": "1-2", "outcome": "read"})
	opaque13 := counter(t, reg, "enclave_gateway_pair_packets_total", map[string]string{"pair": "1-3", "outcome": "opaque"})
	read13 := counter(t, reg, "enclave_gateway_pair_packets_total", map[string]string{"pair": "1-3", "outcome": "read"})
	if read12 == 0 || opaque13 == 0 || read13 != 0 {
		t.Fatalf("read 1-2: %v, opaque 1-3: %v, read 1-3: %v", read12, opaque13, read13)
	}
	// Both initiations are tagged; a Response is when the entry fits
	// within a 1280-byte packet (these do not: a server certificate, the
	// grant and a gateway entry are 1,237 bytes), else it passes untagged.
	tagged := counter(t, reg, "enclave_gateway_packets_total", map[string]string{"kind": "control", "outcome": "tagged"})
	untagged := counter(t, reg, "enclave_gateway_packets_total", map[string]string{"kind": "control", "outcome": "untagged_response"})
	if tagged < 2 || tagged+untagged < 4 {
		t.Errorf("%v handshake packets tagged and %v untagged, want the two initiations tagged and both directions seen", tagged, untagged)
	}
	flows := gw.flows(t)
	if len(flows) == 0 {
		t.Fatal("no flows logged")
	}
	sawTCP := false
	for _, f := range flows {
		if f.Pair != "1-2" || f.VC != "2,1,20" || f.Verdict != "pass" {
			t.Errorf("flow %+v", f)
		}
		if f.Proto == 6 && f.Dst == "100.64.2.1" && f.DstPort == 7 && f.Src == "100.64.1.1" && f.Packets > 0 && f.Bytes > 20000 {
			sawTCP = true
		}
	}
	if !sawTCP {
		t.Errorf("no TCP flow 100.64.1.1 -> 100.64.2.1:7 with its bytes in %+v", flows)
	}
	st, err := os.Stat(gw.capture)
	if err != nil || st.Size() < 20000 {
		t.Fatalf("capture: %v %v", st, err)
	}
	if _, err := exec.LookPath("tshark"); err != nil {
		t.Log("tshark is not installed: the capture is not read back")
		return
	}
	out, err := exec.Command("tshark", "-r", gw.capture, "-T", "fields", "-e", "ip.src", "-e", "tcp.dstport", "-e", "frame.comment").CombinedOutput()
	if err != nil {
		t.Fatalf("tshark: %v: %s", err, out)
	}
	if !strings.Contains(string(out), "100.64.1.1\t7\tsa spi=") || strings.Contains(string(out), "100.64.3.1") {
		t.Fatalf("tshark read:\n%.2000s", out)
	}
}

// TestTagsTellTheServer: a client whose certificate names no enclave is
// refused by a server it reaches directly (nothing trusted says where it
// is), and served through a gateway standing in enclave 1, whose signed
// entry says it.
func TestTagsTellTheServer(t *testing.T) {
	l := newLab(t)
	direct := l.client("nomad", 0, "100.64.1.9/16", netip.AddrPort{})
	if err := exchange(direct, netip.MustParseAddrPort("100.64.2.1:7"), 100, 3*time.Second); err == nil {
		t.Fatal("a client of no known enclave was served without a gateway")
	}
	if n := counter(t, l.srv2.Metrics().Gatherer(), "enclave_agent_handshakes_total", map[string]string{"side": "responder", "result": "refused", "reason": "enclave"}); n == 0 {
		t.Fatal("the server did not refuse for want of an enclave")
	}
	gw := l.gateway("gw1", 1, gwOpts{})
	via := l.client("nomad", 0, "100.64.1.9/16", gw.RelayAddr())
	mustExchange(t, via, "100.64.2.1:7", 1000)
}

// TestMajorityOfChains: one client reaching a server through gateways in
// different enclaves: the server keeps the most frequent enclave of the
// recent chains. Two handshakes through the gateway in enclave 1, then
// one through the gateway in enclave 2: the third is still decided as
// enclave 1 (pair 1-2, allowed; pair 2-2 would be refused) and the
// conflict is counted.
func TestMajorityOfChains(t *testing.T) {
	l := newLab(t)
	gw1 := l.gateway("gw1", 1, gwOpts{})
	gw2 := l.gateway("gw2", 2, gwOpts{})
	creds := l.o.Credentials(ca.Identity{Name: "nomad", Role: ca.RoleClient, Overlay: netip.MustParsePrefix("100.64.1.9/16")})
	id := ca.Identity{Name: "nomad", Role: ca.RoleClient}
	for i, via := range []netip.AddrPort{gw1.RelayAddr(), gw1.RelayAddr(), gw2.RelayAddr()} {
		a := l.agentWith(creds, id, l.routes(), via)
		if err := exchange(a, netip.MustParseAddrPort("100.64.2.1:7"), 500, 10*time.Second); err != nil {
			t.Fatalf("handshake %d: %v", i+1, err)
		}
		a.Close()
	}
	if n := counter(t, l.srv2.Metrics().Gatherer(), "enclave_agent_discovery_disagreements_total", map[string]string{"kind": "conflict"}); n != 1 {
		t.Fatalf("%v conflicts counted, want 1", n)
	}
}

// TestForgedEntryIgnored: a relay that signs its entries with a key that
// is not its certificate's: the server counts each entry as badly signed
// and ignores it, so a client of no known enclave is refused, and one
// whose certificate names its enclave is served as usual.
func TestForgedEntryIgnored(t *testing.T) {
	l := newLab(t)
	creds := l.o.Credentials(ca.Identity{Name: "gw1", Role: ca.RoleGateway, Enclave: 1})
	forged := *creds
	_, other, _ := ed25519.GenerateKey(nil)
	forged.Key = other
	rogue := l.gateway("gw1", 1, gwOpts{creds: &forged})
	nomad := l.client("nomad", 0, "100.64.1.9/16", rogue.RelayAddr())
	if err := exchange(nomad, netip.MustParseAddrPort("100.64.2.1:7"), 100, 3*time.Second); err == nil {
		t.Fatal("a forged entry decided a client's enclave")
	}
	cli := l.client("cli", 1, "100.64.1.1/16", rogue.RelayAddr())
	mustExchange(t, cli, "100.64.2.1:7", 100)
	if n := counter(t, l.srv2.Metrics().Gatherer(), "enclave_agent_discovery_disagreements_total", map[string]string{"kind": "bad_signature"}); n < 2 {
		t.Fatalf("%v badly signed entries counted, want one per handshake", n)
	}
}

// TestPolicyDeny: a gateway whose policy denies TCP to port 5999 drops
// those packets (the connection never opens) and passes the rest; the
// flow log says which flows were denied.
func TestPolicyDeny(t *testing.T) {
	l := newLab(t)
	l.grant("gw1", [2]uint32{1, 2})
	gw := l.gateway("gw1", 1, gwOpts{flowLog: true, policy: "deny:\n  - {proto: tcp, dst_port: 5999}\nallow:\n  - {pair: 1-2, dst: 100.64.2.0/24}\n"})
	cli := l.client("cli", 1, "100.64.1.1/16", gw.RelayAddr())
	mustExchange(t, cli, "100.64.2.1:7", 5000)
	if err := exchange(cli, netip.MustParseAddrPort("100.64.2.1:5999"), 100, 2*time.Second); err == nil {
		t.Fatal("a denied flow got through")
	}
	if n := counter(t, gw.Metrics().Registry(), "enclave_gateway_packets_total", map[string]string{"kind": "data", "outcome": "denied"}); n == 0 {
		t.Fatal("no denied packets counted")
	}
	var denied, allowed bool
	for _, f := range gw.flows(t) {
		switch {
		case f.DstPort == 5999 && f.Verdict == "deny":
			denied = true
		case f.DstPort == 7 && f.Verdict == "allow":
			allowed = true
		case f.DstPort == 5999 || f.DstPort == 7:
			t.Errorf("flow %+v", f)
		}
	}
	if !denied || !allowed {
		t.Fatalf("denied flow logged: %v, allowed flow logged: %v", denied, allowed)
	}
}

// TestDirectKeyExchange: a gateway that cannot derive (NoDerive), granted
// (1,2), marks handshakes need-key; the server of pair 1-2 has the key
// service authorise it and delivers the SA's keys, so the gateway reads
// the traffic; the server of pair 1-3 is refused by the key service
// (the gateway holds no grant for it), logs, counts and tells the
// gateway, and the key service audits the refusal.
func TestDirectKeyExchange(t *testing.T) {
	l := newLab(t)
	l.grant("legacy", [2]uint32{1, 2})
	gw := l.gateway("legacy", 1, gwOpts{noDerive: true, flowLog: true})
	if n := gw.table.Len(); n != 0 {
		t.Fatalf("a gateway that cannot derive holds %d pair keys", n)
	}
	cli := l.client("cli", 1, "100.64.1.1/16", gw.RelayAddr())
	mustExchange(t, cli, "100.64.2.1:7", 5000)
	reg := gw.Metrics().Registry()
	waitFor(t, 5*time.Second, "keys delivered", func() bool {
		return counter(t, reg, "enclave_gateway_key_exchange_total", map[string]string{"outcome": "delivered"}) >= 1
	})
	mustExchange(t, cli, "100.64.2.1:7", 5000) // the SA is read now
	if n := counter(t, reg, "enclave_gateway_pair_packets_total", map[string]string{"pair": "1-2", "outcome": "read"}); n == 0 {
		t.Fatal("the gateway read nothing with the delivered keys")
	}
	if n := counter(t, l.srv2.Metrics().Gatherer(), "enclave_agent_intermediary_total", map[string]string{"kind": "key_exchange", "outcome": "delivered"}); n < 1 {
		t.Fatal("the server did not count its delivery")
	}

	mustExchange(t, cli, "100.64.3.1:7", 1000) // the SA works; the gateway only cannot see it
	waitFor(t, 5*time.Second, "the refusal", func() bool {
		return counter(t, reg, "enclave_gateway_key_exchange_total", map[string]string{"outcome": "refused"}) >= 1
	})
	if n := counter(t, l.srv3.Metrics().Gatherer(), "enclave_agent_intermediary_total", map[string]string{"kind": "key_exchange", "outcome": "refused"}); n < 1 {
		t.Fatal("the server did not count the refusal")
	}
	if n := counter(t, reg, "enclave_gateway_pair_packets_total", map[string]string{"pair": "1-3", "outcome": "read"}); n != 0 {
		t.Fatal("the gateway read a pair it is not granted")
	}
	log, err := os.ReadFile(l.o.AuditPath)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(log), "AuthorizeDirectKeyExchange") || !strings.Contains(string(log), `holds no grant covering pair 1-3`) {
		t.Fatalf("the refusal is not in the audit log:\n%.3000s", log)
	}
	for _, f := range gw.flows(t) {
		if f.Pair != "1-2" {
			t.Errorf("flow of pair %s logged", f.Pair)
		}
	}
}

// TestLateJoin: a gateway that cannot derive meets an SA formed while it
// could not read it (its grant came later). With --fail-open it passes
// the SA's packets unread meanwhile and proves to the server, with a
// packet it forwarded, that it is on the path (its first proof taken);
// the server has the client re-establish the SA through it. Without, it
// holds the SA's packets (none of the pair passes unread once granted)
// and tells the client the SA is not held; the client re-establishes it.
// Either way the gateway then reads the new SA, while the TCP connection
// over it carries on without a break.
func TestLateJoin(t *testing.T) {
	for _, failOpen := range []bool{true, false} {
		t.Run(fmt.Sprintf("fail-open=%v", failOpen), func(t *testing.T) {
			l := newLab(t)
			gw := l.gateway("legacy", 1, gwOpts{noDerive: true, failOpen: failOpen})
			cli := l.client("cli", 1, "100.64.1.1/16", gw.RelayAddr())
			echo := echoConn(t, cli, "100.64.2.1:7", 20*time.Second)
			ping := func() {
				t.Helper()
				if err := echo(); err != nil {
					t.Fatal(err)
				}
			}
			ping()
			reg := gw.Metrics().Registry()
			opaque := counter(t, reg, "enclave_gateway_pair_packets_total", map[string]string{"pair": "1-2", "outcome": "opaque"})
			if opaque == 0 {
				t.Fatal("the SA was not opaque to the gateway")
			}
			l.grant("legacy", [2]uint32{1, 2})
			if err := gw.fetchKeys(context.Background()); err != nil { // as the gateway's periodic refetch would
				t.Fatal(err)
			}
			granted := time.Now()
			opaque = counter(t, reg, "enclave_gateway_pair_packets_total", map[string]string{"pair": "1-2", "outcome": "opaque"})
			waitFor(t, 15*time.Second, "the gateway reads the re-established SA", func() bool {
				ping()
				return counter(t, reg, "enclave_gateway_pair_packets_total", map[string]string{"pair": "1-2", "outcome": "read"}) > 0
			})
			t.Logf("read %v after the grant", time.Since(granted).Round(time.Millisecond))
			srv := l.srv2.Metrics().Gatherer()
			accepted := counter(t, srv, "enclave_agent_intermediary_total", map[string]string{"kind": "rekey_request", "outcome": "accepted"})
			unproven := counter(t, srv, "enclave_agent_intermediary_total", map[string]string{"kind": "rekey_request", "outcome": "unproven"})
			if failOpen {
				if accepted != 1 || unproven != 0 {
					t.Fatalf("%v rekey requests accepted and %v refused as unproven, want 1 and 0", accepted, unproven)
				}
				if n := counter(t, reg, "enclave_gateway_late_join_total", map[string]string{"outcome": "sent"}); n < 1 {
					t.Fatal("no rekey request counted as sent")
				}
			} else {
				if after := counter(t, reg, "enclave_gateway_pair_packets_total", map[string]string{"pair": "1-2", "outcome": "opaque"}); after != opaque {
					t.Fatalf("%v packets of the granted pair passed unread", after-opaque)
				}
				if n := counter(t, reg, "enclave_gateway_packets_total", map[string]string{"kind": "data", "outcome": "nudged"}); n < 1 {
					t.Fatalf("%v nudges", n)
				}
			}
			ping()
		})
	}
}

// TestRelayTo: a relay limited to some destinations forwards nothing
// elsewhere, and counts what it refused.
func TestRelayTo(t *testing.T) {
	l := newLab(t)
	gw := l.gateway("gw1", 1, gwOpts{relayTo: []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24")}})
	cli := l.client("cli", 1, "100.64.1.1/16", gw.RelayAddr())
	if err := exchange(cli, netip.MustParseAddrPort("100.64.2.1:7"), 100, 2*time.Second); err == nil {
		t.Fatal("the relay forwarded to a destination outside --relay-to")
	}
	if n := counter(t, gw.Metrics().Registry(), "enclave_gateway_packets_total", map[string]string{"outcome": "relay_refused"}); n == 0 {
		t.Fatal("nothing counted as refused")
	}
}
