package gateway

import (
	"errors"
	"net/netip"
	"strings"
	"testing"

	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/registry"
)

func tcp(src, dst string, sport, dport uint16) *tuple {
	return &tuple{proto: protoTCP, src: netip.MustParseAddr(src), dst: netip.MustParseAddr(dst), srcPort: sport, dstPort: dport}
}

func TestPolicy(t *testing.T) {
	p, err := ParsePolicy([]byte(`
allow:
  - {proto: tcp, dst: 10.7.0.0/16, dst_port: 443}
  - {pair: 1-3}
deny:
  - {proto: tcp, dst_port: 5999}
  - {pair: 3-1, src_port: 1000-1999}
  - {proto: icmp, src: 10.1.2.3}
`))
	if err != nil {
		t.Fatal(err)
	}
	p12, p13 := registry.NewPair(1, 2), registry.NewPair(3, 1)
	icmp := &tuple{proto: protoICMP, src: netip.MustParseAddr("10.1.2.3"), dst: netip.MustParseAddr("10.7.0.1")}
	cases := []struct {
		name string
		t    *tuple
		pair registry.Pair
		want Verdict
	}{
		{"allowed by address and port", tcp("10.1.0.1", "10.7.3.4", 50000, 443), p12, Allow},
		{"no rule", tcp("10.1.0.1", "10.8.3.4", 50000, 443), p12, Pass},
		{"deny wins over allow", tcp("10.1.0.1", "10.7.3.4", 50000, 5999), p12, Deny},
		{"pair allow", tcp("10.1.0.1", "10.9.0.1", 50000, 80), p13, Allow},
		{"pair deny with a port range", tcp("10.1.0.1", "10.9.0.1", 1500, 80), p13, Deny},
		{"port range elsewhere", tcp("10.1.0.1", "10.9.0.1", 1500, 80), p12, Pass},
		{"icmp from one host", icmp, p12, Deny},
		{"udp is not tcp", &tuple{proto: protoUDP, src: netip.MustParseAddr("10.1.0.1"), dst: netip.MustParseAddr("10.7.3.4"), dstPort: 5999}, p12, Pass},
	}
	for _, c := range cases {
		if got := p.decide(c.t, c.pair); got != c.want {
			t.Errorf("%s: %v, want %v", c.name, got, c.want)
		}
	}
	strict, err := ParsePolicy([]byte("default: deny\nallow: [{proto: udp, dst_port: 53}]\n"))
	if err != nil {
		t.Fatal(err)
	}
	if strict.decide(tcp("10.0.0.1", "10.0.0.2", 1, 80), p12) != Deny {
		t.Error("default deny passed a packet no rule allows")
	}
	if empty, err := ParsePolicy(nil); err != nil || empty.decide(tcp("10.0.0.1", "10.0.0.2", 1, 80), p12) != Pass {
		t.Errorf("an empty policy: %v", err)
	}
	if (*Policy)(nil).decide(icmp, p12) != Pass {
		t.Error("no policy denied")
	}
}

func TestPolicyErrors(t *testing.T) {
	for _, c := range []struct{ yaml, want string }{
		{"deny: [{proto: tcpp}]", "proto"},
		{"deny: [{dst: 10.0.0.0/33}]", "dst"},
		{"deny: [{src: nowhere}]", "src"},
		{"deny: [{dst_port: 0}]", "dst_port"},
		{"deny: [{dst_port: 70000}]", "dst_port"},
		{"deny: [{src_port: 20-10}]", "src_port"},
		{"deny: [{pair: 1}]", "pair"},
		{"deny: [{pair: 0-1}]", "pair"},
		{"deny: [{proto: icmp, dst_port: 80}]", "ports"},
		{"deny: [{prot: tcp}]", "prot"},
		{"default: maybe", "default"},
		{"allow: 3", "line 1"},
		{"deny: [{proto: " + strings.Repeat("x", 5000) + "}]", "proto"},
	} {
		_, err := ParsePolicy([]byte(c.yaml))
		if !errors.Is(err, ErrPolicy) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%.40s: %v", c.yaml, err)
		}
		if err != nil && len(err.Error()) > 400 {
			t.Errorf("%.40s: the error repeats the input at length (%d bytes)", c.yaml, len(err.Error()))
		}
	}
}

// FuzzPolicy: any file parses or is refused with ErrPolicy; a policy that
// parses decides any packet without panicking.
func FuzzPolicy(f *testing.F) {
	f.Add([]byte("deny: [{proto: tcp, dst_port: 5999}]\nallow: [{pair: 1-2, src: 10.0.0.0/8, src_port: 1-1024}]\ndefault: deny\n"))
	f.Add([]byte("allow: [{proto: 58, dst: '2001:db8::/32'}]"))
	f.Add([]byte(""))
	f.Fuzz(func(t *testing.T, b []byte) {
		p, err := ParsePolicy(b)
		if err != nil {
			if !errors.Is(err, ErrPolicy) {
				t.Fatalf("error %v is not ErrPolicy", err)
			}
			return
		}
		p.decide(tcp("10.0.0.1", "10.0.0.2", 1000, 5999), registry.NewPair(1, 2))
		p.decide(&tuple{proto: protoICMPv6, src: netip.MustParseAddr("2001:db8::1"), dst: netip.MustParseAddr("2001:db8::2")}, registry.NewPair(7, 7))
	})
}

// TestPolicyHeadersAndFragments: port rules see through IPv6 extension
// headers, and a packet whose ports cannot be read (a later fragment, a
// first fragment cut before its ports, a header chain cut short) is denied
// where a port rule could apply and never allowed by one.
func TestPolicyHeadersAndFragments(t *testing.T) {
	deny, err := ParsePolicy([]byte("deny:\n  - {proto: tcp, dst_port: 5999}\n"))
	if err != nil {
		t.Fatal(err)
	}
	allowOnly, err := ParsePolicy([]byte("default: deny\nallow:\n  - {proto: tcp, dst_port: 80}\n"))
	if err != nil {
		t.Fatal(err)
	}
	tcp := func(dport uint16) []byte {
		h := make([]byte, 20)
		h[0], h[1], h[2], h[3] = 0x30, 0x39, byte(dport>>8), byte(dport)
		return h
	}
	v6 := func(nh byte, rest ...[]byte) []byte {
		p := make([]byte, 40)
		p[0], p[6] = 0x60, nh
		copy(p[8:], netip.MustParseAddr("fd00::1").AsSlice())
		copy(p[24:], netip.MustParseAddr("fd00::2").AsSlice())
		for _, r := range rest {
			p = append(p, r...)
		}
		return p
	}
	ext := func(nh byte) []byte { return []byte{nh, 0, 1, 4, 0, 0, 0, 0} } // 8 bytes, PadN
	frag := func(nh byte, offset uint16) []byte {
		return []byte{nh, 0, byte(offset << 3 >> 8), byte(offset << 3), 0, 0, 0, 1}
	}
	v4 := func(proto byte, fragOffset uint16, l4 []byte) []byte {
		p := make([]byte, 20)
		p[0], p[9] = 0x45, proto
		p[6], p[7] = byte(fragOffset>>8), byte(fragOffset)
		copy(p[12:], []byte{10, 0, 0, 1})
		copy(p[16:], []byte{10, 0, 0, 2})
		return append(p, l4...)
	}
	for _, c := range []struct {
		name   string
		pkt    []byte
		policy *Policy
		want   Verdict
	}{
		{"v6 tcp 5999", v6(6, tcp(5999)), deny, Deny},
		{"v6 tcp 80", v6(6, tcp(80)), deny, Pass},
		{"v6 destination options, tcp 5999", v6(60, ext(6), tcp(5999)), deny, Deny},
		{"v6 hop-by-hop and routing, tcp 5999", v6(0, ext(43), ext(6), tcp(5999)), deny, Deny},
		{"v6 first fragment, tcp 5999", v6(44, frag(6, 0), tcp(5999)), deny, Deny},
		{"v6 first fragment, tcp 80", v6(44, frag(6, 0), tcp(80)), deny, Pass},
		{"v6 later fragment of tcp", v6(44, frag(6, 100), make([]byte, 16)), deny, Deny},
		{"v6 later fragment of udp", v6(44, frag(17, 100), make([]byte, 16)), deny, Pass},
		{"v6 chain cut short", v6(0, []byte{6, 1, 0, 0, 0, 0, 0, 0}), deny, Deny},
		{"v6 chain too long", v6(60, ext(60), ext(60), ext(60), ext(60), ext(60), ext(60), ext(60), ext(6), tcp(5999)), deny, Deny},
		{"v4 tcp 5999", v4(6, 0, tcp(5999)), deny, Deny},
		{"v4 later fragment of tcp", v4(6, 100, make([]byte, 16)), deny, Deny},
		{"v4 later fragment of icmp", v4(1, 100, make([]byte, 16)), deny, Pass},
		{"v4 first fragment cut before the ports", v4(6, 0x2000, []byte{0x30}), deny, Deny},
		{"allow-only: v4 tcp 80", v4(6, 0, tcp(80)), allowOnly, Allow},
		{"allow-only: v4 later fragment of tcp", v4(6, 100, make([]byte, 16)), allowOnly, Deny},
		{"allow-only: v6 destination options, tcp 80", v6(60, ext(6), tcp(80)), allowOnly, Allow},
	} {
		var tu tuple
		if !innerTuple(&tu, c.pkt) {
			t.Errorf("%s: not parsed", c.name)
			continue
		}
		if got := c.policy.decide(&tu, registry.NewPair(1, 2)); got != c.want {
			t.Errorf("%s: %v (tuple %+v), want %v", c.name, got, tu, c.want)
		}
	}
}

// TestPolicySubEnclaves: a policy's pair rules under a sub-enclave layout
// (DESIGN §3a): a dotted pair is read once the gateway knows the org's
// layout (until then it matches nothing), a rule on a pair covers the
// sub-pairs beneath it, and a pair no id of the layout can be is refused.
func TestPolicySubEnclaves(t *testing.T) {
	p, err := ParsePolicy([]byte("deny:\n  - {proto: tcp, dst_port: 80, pair: 3.2-7.1}\n  - {proto: tcp, dst_port: 22, pair: 3-7}\n"))
	if err != nil {
		t.Fatal(err)
	}
	l, _ := keys.ParseLayout("8.8")
	pair := func(s string) registry.Pair {
		q, err := registry.ParsePairIn(l, s)
		if err != nil {
			t.Fatal(err)
		}
		return q
	}
	web, ssh := tcp("10.1.0.1", "10.7.0.1", 4000, 80), tcp("10.1.0.1", "10.7.0.1", 4000, 22)
	if v := p.decide(web, pair("3.2-7.1")); v != Pass {
		t.Fatalf("a dotted rule matched before the layout was known: %v", v)
	}
	q, err := p.Under(l)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		t    *tuple
		pair string
		want Verdict
	}{
		{web, "3.2-7.1", Deny},
		{web, "3.1-7.1", Pass}, // the sibling
		{ssh, "3.1-7.2", Deny}, // beneath 3-7
		{ssh, "3-7", Deny},
		{ssh, "3.1-8", Pass},
	} {
		if v := q.decide(c.t, pair(c.pair)); v != c.want {
			t.Errorf("port %d of %s: %v, want %v", c.t.dstPort, c.pair, v, c.want)
		}
	}
	if _, err := q.Under(keys.Layout{}); err == nil {
		t.Fatal("a dotted pair read under the default layout")
	}
	if bad, _ := ParsePolicy([]byte("deny:\n  - {pair: 0.3-7}\n")); bad != nil {
		if _, err := bad.Under(l); err == nil {
			t.Fatal("a pair of no enclave (0.3) read under 8.8")
		}
	}
	if _, err := ParsePolicy([]byte("deny:\n  - {pair: 3.x-7}\n")); err == nil {
		t.Fatal("a pair that is no dotted pair parsed")
	}
}

// TestPolicyUnderFailsClosed: a policy whose pair rules do not read under
// the org's layout, learnt from the key service, leaves no deny rule
// silently matching nothing: every flow read is denied until it is fixed.
func TestPolicyUnderFailsClosed(t *testing.T) {
	g, _, _ := benchRun(t, 1)
	p, err := ParsePolicy([]byte("deny:\n  - {proto: tcp, dst_port: 22, pair: 3-7}\n  - {proto: tcp, dst_port: 80, pair: 3.300-7}\n"))
	if err != nil {
		t.Fatal(err)
	}
	g.flows.setPolicy(p)
	l, _ := keys.ParseLayout("8.8")
	g.policyUnder(l)
	q, _ := registry.ParsePairIn(l, "3.1-7.2")
	if v := g.flows.policy.Load().p.decide(tcp("10.1.0.1", "10.7.0.1", 4000, 443), q); v != Deny {
		t.Fatalf("a flow under a policy that does not read: %v, want deny", v)
	}
	// Fixed and reloaded, it is read under the layout.
	good, _ := ParsePolicy([]byte("deny:\n  - {proto: tcp, dst_port: 22, pair: 3-7}\n"))
	g.names.set(l)
	if err := g.SetPolicy(good); err != nil {
		t.Fatal(err)
	}
	pe := g.flows.policy.Load()
	if v := pe.p.decide(tcp("10.1.0.1", "10.7.0.1", 4000, 22), q); v != Deny {
		t.Fatalf("ssh of 3.1-7.2 under a deny on 3-7: %v", v)
	}
	if v := pe.p.decide(tcp("10.1.0.1", "10.7.0.1", 4000, 443), q); v != Pass {
		t.Fatalf("https of 3.1-7.2: %v", v)
	}
	if err := g.SetPolicy(p); err == nil {
		t.Fatal("a reload of a policy that does not read under the layout was taken")
	}
}
