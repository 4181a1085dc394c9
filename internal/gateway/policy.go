package gateway

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	"go.yaml.in/yaml/v3"

	"github.com/enclavekeys/enclave/internal/echo"
	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/registry"
)

// Policy is the gateway's allow/deny policy over the inner packets it
// reads (the YAML file of --policy):
//
//	default: allow          # or deny: what passes without a matching rule
//	allow:
//	  - {proto: tcp, dst: 10.7.0.0/16, dst_port: 443}
//	deny:
//	  - {proto: tcp, dst_port: 5999}
//	  - {pair: 1-3, src_port: 1000-1999}
//
// Every field of a rule is optional; a rule matches a packet when all its
// fields do. Deny rules win over allow rules; without a matching rule the
// default applies (allow, unless the file says otherwise). Ports match
// only TCP and UDP packets. Traffic the gateway cannot read is not subject
// to policy (it is counted as opaque).
type Policy struct {
	Default Verdict
	Allow   []Rule
	Deny    []Rule
	// layout is the sub-enclave layout its pair rules are read under
	// (DESIGN §3a): the org's, once the gateway has learnt it (Under).
	layout keys.Layout
}

// Rule is one policy rule; a zero field matches anything.
type Rule struct {
	Proto            uint8 // IP protocol number; 0: any
	HasProto         bool
	Src, Dst         netip.Prefix
	SrcPort, DstPort PortRange
	Pair             registry.Pair // zero: any, or not read yet (pairText)
	// pairText is the pair as written (3-7, or dotted: 3.1-7.2), read
	// under the org's layout when the gateway learns it; a rule whose
	// pair is not read yet matches nothing.
	pairText string
}

// PortRange is an inclusive range of ports; zero matches any.
type PortRange struct{ Lo, Hi uint16 }

func (r PortRange) any() bool             { return r.Lo == 0 && r.Hi == 0 }
func (r PortRange) matches(p uint16) bool { return r.any() || (p >= r.Lo && p <= r.Hi) }
func (r PortRange) String() string        { return fmt.Sprintf("%d-%d", r.Lo, r.Hi) }
func (p *Policy) String() string {
	return fmt.Sprintf("%d allow, %d deny rules", len(p.Allow), len(p.Deny))
}
func (r *Rule) needsPorts() bool { return !r.SrcPort.any() || !r.DstPort.any() }
func hasPorts(proto uint8) bool  { return proto == protoTCP || proto == protoUDP }

// pairMatches reports whether the rule's pair, at its level, covers p (a
// rule on 3-7 covers 3.1-7.2; DESIGN §3a).
func (r *Rule) pairMatches(l keys.Layout, p registry.Pair) bool {
	if r.pairText == "" {
		return true
	}
	return r.Pair != (registry.Pair{}) && registry.Covers(l, r.Pair, p)
}

// Verdict is the policy's answer for a flow.
type Verdict uint8

// The verdicts: Pass (no rule matched, the default is allow), Allow (an
// allow rule matched), Deny (a deny rule matched, or none did and the
// default is deny).
const (
	Pass Verdict = iota
	Allow
	Deny
)

func (v Verdict) String() string {
	switch v {
	case Allow:
		return "allow"
	case Deny:
		return "deny"
	}
	return "pass"
}

// ErrPolicy: the policy file is malformed.
var ErrPolicy = errors.New("gateway: bad policy")

// The IP protocols policy names.
const (
	protoICMP   = 1
	protoTCP    = 6
	protoUDP    = 17
	protoICMPv6 = 58
)

var protoNames = map[string]uint8{"icmp": protoICMP, "tcp": protoTCP, "udp": protoUDP, "icmpv6": protoICMPv6, "ipv6-icmp": protoICMPv6}

// policyFile is the YAML form.
type policyFile struct {
	Default string     `yaml:"default"`
	Allow   []ruleFile `yaml:"allow"`
	Deny    []ruleFile `yaml:"deny"`
}

type ruleFile struct {
	Proto   string `yaml:"proto"`
	Src     string `yaml:"src"`
	Dst     string `yaml:"dst"`
	SrcPort string `yaml:"src_port"`
	DstPort string `yaml:"dst_port"`
	Pair    string `yaml:"pair"`
}

// ParsePolicy parses a policy file. Unknown keys, bad values and rules
// that could never match are errors that name the rule.
func ParsePolicy(raw []byte) (*Policy, error) {
	var f policyFile
	dec := yaml.NewDecoder(bytes.NewReader(raw))
	dec.KnownFields(true)
	if err := dec.Decode(&f); err != nil && !errors.Is(err, io.EOF) { // an empty file is an empty policy
		return nil, fmt.Errorf("%w: %v", ErrPolicy, echo.Cut(err.Error()))
	}
	p := &Policy{}
	switch strings.ToLower(strings.TrimSpace(f.Default)) {
	case "", "allow", "pass":
	case "deny":
		p.Default = Deny
	default:
		return nil, fmt.Errorf("%w: default must be allow or deny, not %q", ErrPolicy, echo.Cut(f.Default))
	}
	for _, list := range []struct {
		name string
		in   []ruleFile
		out  *[]Rule
	}{{"allow", f.Allow, &p.Allow}, {"deny", f.Deny, &p.Deny}} {
		for i, rf := range list.in {
			r, err := rf.rule()
			if err != nil {
				return nil, fmt.Errorf("%w: %s rule %d: %v", ErrPolicy, list.name, i+1, err)
			}
			*list.out = append(*list.out, r)
		}
	}
	return p, nil
}

func (rf *ruleFile) rule() (Rule, error) {
	var r Rule
	if s := strings.ToLower(strings.TrimSpace(rf.Proto)); s != "" {
		if n, ok := protoNames[s]; ok {
			r.Proto = n
		} else if v, err := strconv.ParseUint(s, 10, 8); err == nil {
			r.Proto = uint8(v)
		} else {
			return r, fmt.Errorf("proto %q is not tcp, udp, icmp, icmpv6 or a protocol number", echo.Cut(rf.Proto))
		}
		r.HasProto = true
	}
	var err error
	if r.Src, err = prefix(rf.Src); err != nil {
		return r, fmt.Errorf("src: %v", err)
	}
	if r.Dst, err = prefix(rf.Dst); err != nil {
		return r, fmt.Errorf("dst: %v", err)
	}
	if r.SrcPort, err = portRange(rf.SrcPort); err != nil {
		return r, fmt.Errorf("src_port: %v", err)
	}
	if r.DstPort, err = portRange(rf.DstPort); err != nil {
		return r, fmt.Errorf("dst_port: %v", err)
	}
	if r.needsPorts() && r.HasProto && !hasPorts(r.Proto) {
		return r, errors.New("ports are given but the protocol has none (only tcp and udp do)")
	}
	if s := strings.TrimSpace(rf.Pair); s != "" {
		r.pairText = s
		if !strings.Contains(s, ".") { // plain ids read now; dotted ones need the org's layout (Under)
			if r.Pair, err = registry.ParsePair(s); err != nil {
				return r, err
			}
		} else if !dottedPair(s) {
			return r, fmt.Errorf("pair %q: not I-J with dotted ids as 3.1-7.2", echo.Cut(s))
		}
	}
	return r, nil
}

// dottedPair reports whether s has the form of a pair of dotted ids
// (3.1-7.2), whose values only the org's layout can check.
func dottedPair(s string) bool {
	a, b, ok := strings.Cut(s, "-")
	for _, id := range []string{a, b} {
		for _, part := range strings.Split(strings.TrimSpace(id), ".") {
			if _, err := strconv.ParseUint(part, 10, 16); err != nil {
				return false
			}
		}
	}
	return ok
}

// Under is p with its pair rules read under layout l, the org's: the
// gateway calls it when it learns the layout from the key service. A
// pair no id of l can be is an error naming the rule.
func (p *Policy) Under(l keys.Layout) (*Policy, error) {
	out := &Policy{Default: p.Default, Allow: slices.Clone(p.Allow), Deny: slices.Clone(p.Deny), layout: l}
	for _, list := range []struct {
		name  string
		rules []Rule
	}{{"allow", out.Allow}, {"deny", out.Deny}} {
		for i := range list.rules {
			r := &list.rules[i]
			if r.pairText == "" {
				continue
			}
			q, err := registry.ParsePairIn(l, r.pairText)
			if err == nil && (!l.Nested(q.A) || !l.Nested(q.B)) {
				err = fmt.Errorf("pair %q names no enclave of the layout (a part above a sub-enclave's level is 0)", echo.Cut(r.pairText))
			}
			if err != nil {
				return nil, fmt.Errorf("%w: %s rule %d: under the org's layout %s: %v", ErrPolicy, list.name, i+1, l, err)
			}
			r.Pair = q
		}
	}
	return out, nil
}

// resolved reports whether every pair rule of p has been read.
func (p *Policy) resolved() bool {
	for _, list := range [][]Rule{p.Allow, p.Deny} {
		for _, r := range list {
			if r.pairText != "" && r.Pair == (registry.Pair{}) {
				return false
			}
		}
	}
	return true
}

// Layout is the layout p's pair rules were read under.
func (p *Policy) Layout() keys.Layout { return p.layout }

func prefix(s string) (netip.Prefix, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return netip.Prefix{}, nil
	}
	if strings.Contains(s, "/") {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return p, fmt.Errorf("%q is not an address or CIDR prefix", echo.Cut(s))
		}
		return p.Masked(), nil
	}
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("%q is not an address or CIDR prefix", echo.Cut(s))
	}
	return netip.PrefixFrom(a, a.BitLen()), nil
}

func portRange(s string) (PortRange, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return PortRange{}, nil
	}
	lo, hi, isRange := strings.Cut(s, "-")
	if !isRange {
		hi = lo
	}
	l, err1 := strconv.ParseUint(strings.TrimSpace(lo), 10, 16)
	h, err2 := strconv.ParseUint(strings.TrimSpace(hi), 10, 16)
	if err1 != nil || err2 != nil || l == 0 || l > h {
		return PortRange{}, fmt.Errorf("%q is not a port (1-65535) or a range LO-HI", echo.Cut(s))
	}
	return PortRange{uint16(l), uint16(h)}, nil
}

// tuple is an inner packet's 5-tuple (ports 0 for protocols without).
type tuple struct {
	proto            uint8
	src, dst         netip.Addr
	srcPort, dstPort uint16
	// noPorts: the packet's ports cannot be read (a non-first fragment,
	// a first fragment cut before them, an IPv6 header chain the gateway
	// cannot walk). A deny rule with ports matches it wherever its other
	// fields do; an allow rule with ports never does.
	noPorts bool
	// unknown: the transport protocol itself could not be found (an IPv6
	// header chain cut short or too long); proto is then not to be trusted
	// and a deny rule of any protocol with ports matches.
	unknown bool
}

// matches reports whether rule r covers an inner packet; deny says how a
// packet whose ports cannot be read is taken (see tuple.noPorts).
func (r *Rule) matches(l keys.Layout, t *tuple, pair registry.Pair, deny bool) bool {
	if r.HasProto && r.Proto != t.proto && !(deny && t.unknown) {
		return false
	}
	switch {
	case !r.needsPorts():
		if t.unknown && r.HasProto && r.Proto != t.proto {
			return false // a protocol-only rule is not taken on a guess
		}
	case t.noPorts && (hasPorts(t.proto) || t.unknown):
		if !deny {
			return false
		}
	case !hasPorts(t.proto) || !r.SrcPort.matches(t.srcPort) || !r.DstPort.matches(t.dstPort):
		return false
	}
	if r.Src.IsValid() && !r.Src.Contains(t.src) {
		return false
	}
	if r.Dst.IsValid() && !r.Dst.Contains(t.dst) {
		return false
	}
	return r.pairMatches(l, pair)
}

// decide is the policy's verdict for an inner packet of pair.
func (p *Policy) decide(t *tuple, pair registry.Pair) Verdict {
	if p == nil {
		return Pass
	}
	for i := range p.Deny {
		if p.Deny[i].matches(p.layout, t, pair, true) {
			return Deny
		}
	}
	for i := range p.Allow {
		if p.Allow[i].matches(p.layout, t, pair, false) {
			return Allow
		}
	}
	return p.Default
}
