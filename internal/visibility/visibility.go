// Package visibility answers, for an organisation, who can read what
// (DESIGN §8): for every pair of enclaves and every SA observed, which
// devices hold a key that opens its packets, and by what right: the org
// key, a pair key (an enclave key server's, or a gateway's or monitor's
// grant), a server key (the SA's own server), the SA's keys (its client,
// or an intermediary by direct key exchange). Pairs that policy forbids
// carry no SA at all. It builds the map from the key service's registry
// (the Status an admin reads) and the SAs seen (a lab's run, gateways'
// flow logs), and draws it as one self-contained HTML page, DOT or JSON
// (render.go).
package visibility

import (
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/enclavekeys/enclave/internal/api"
	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/registry"
)

// The rights by which a device reads traffic, strongest first.
const (
	RightOrgKey      = "org key"
	RightMonitor     = "org-wide grant (every pair key)"
	RightEnclaveTier = "pair key, as an enclave key server of the pair"
	RightGrant       = "pair key, by grant"
	RightServerKey   = "server key (its own SAs in the pair)"
	RightParty       = "SA keys (a party to the SA)"
	RightExchange    = "SA keys, by direct key exchange"
	// RightMayExchange is a grant held by a gateway that cannot derive:
	// it reads a pair's SAs only when their servers hand it their keys.
	RightMayExchange = "granted, holds no pair key: SA keys by direct key exchange, SA by SA"
)

// Reader is a device that can read some traffic, and why.
type Reader struct {
	Device string `json:"device"`
	Role   string `json:"role"`
	Right  string `json:"right"`
	// Scope narrows a right that covers only part of a pair's traffic
	// (a server's own SAs).
	Scope string `json:"scope,omitempty"`
	// Unsure says why the reader may not read yet, or at all: its host
	// has not joined, or its pair's enclave is in enclave-key mode and
	// only its own key server's grants give the pair's key. Such a reader
	// counts against never and only assertions, not for always ones.
	Unsure string `json:"unsure,omitempty"`
}

// Enclave is an enclave of the organisation, or a sub-enclave (DESIGN
// §3a): Label is its id as operators write it (3, 3.2), Level its depth.
type Enclave struct {
	ID    uint32 `json:"id"`
	Name  string `json:"name"`
	Label string `json:"label"`
	Level int    `json:"level,omitempty"`
	// EnclaveKey: its key server holds an enclave key of its own
	// (enclave-key mode): no org-tier reader reads its pairs.
	EnclaveKey bool `json:"enclave_key,omitempty"`
}

// Device is a registered device.
type Device struct {
	Name     string  `json:"name"`
	Role     string  `json:"role"`
	Enclave  uint32  `json:"enclave,omitempty"`
	ServerID *uint32 `json:"server_id,omitempty"`
	Revoked  bool    `json:"revoked,omitempty"`
	// Pending: its host has not joined (or confirmed its join) yet.
	Pending bool `json:"pending,omitempty"`
	// Reads names the pairs and SAs the device can read (filled by Build).
	Reads []string `json:"reads"`
}

// Display is the enclave's id as written (a map built without labels:
// its number).
func (e Enclave) Display() string {
	if e.Label != "" {
		return e.Label
	}
	return fmt.Sprint(e.ID)
}

// Pair is an unordered pair of enclaves (A ≤ B) and who reads its traffic.
type Pair struct {
	A uint32 `json:"a"`
	B uint32 `json:"b"`
	// Name is the pair as operators write it (3-7, 3.1-7.2).
	Name    string `json:"name"`
	Allowed bool   `json:"allowed"`
	// Rule is the rule given for exactly this pair, "allow" or "forbid"
	// (empty: a rule above it decides, or none does).
	Rule string `json:"rule,omitempty"`
	// Assertions are the sight assertions that guard this pair (issue
	// 34): those on it or, for never and only, on a pair above it.
	Assertions []string `json:"assertions,omitempty"`
	Generation uint32   `json:"generation,omitempty"`
	Readers    []Reader `json:"readers"`
	SAs        int      `json:"sas"`
}

// Key is the pair's "A-B" spelling (dotted ids under a layout).
func (p *Pair) Key() string {
	if p.Name != "" {
		return p.Name
	}
	return fmt.Sprintf("%d-%d", p.A, p.B)
}

// SA is an SA observed: its VC, SPI (one direction's), the client if
// known, and who reads it.
type SA struct {
	Enclave uint32   `json:"enclave"` // i, the server's
	Peer    uint32   `json:"peer"`    // j, the client's
	Server  uint32   `json:"server"`  // k
	SPI     uint32   `json:"spi"`
	Client  string   `json:"client,omitempty"`
	Readers []Reader `json:"readers"`
}

// Key names the SA as the map shows it.
func (s *SA) Key() string { return fmt.Sprintf("%d,%d,%d/%08x", s.Enclave, s.Peer, s.Server, s.SPI) }

// Observed is an SA seen somewhere: a lab's agents, a gateway's flow log.
type Observed struct {
	Enclave, Peer, Server, SPI uint32
	Client                     string
	// Delivered names the intermediaries that got this SA's keys by
	// direct key exchange.
	Delivered []string
}

// Map is the whole picture.
type Map struct {
	Org string `json:"org"`
	// Layout is the org's sub-enclave layout (empty: the default, one
	// level); a pair key of a level reads the pairs beneath it.
	Layout   string    `json:"layout,omitempty"`
	Enclaves []Enclave `json:"enclaves"`
	Devices  []Device  `json:"devices"`
	// Pairs holds every pair of registered enclaves (each enclave with
	// itself too), allowed or not.
	Pairs []Pair `json:"pairs"`
	SAs   []SA   `json:"sas"`
	// Reads, Reported, Window and At say who did read (reads.go): what
	// readers were seen reading in the Window before At, by the sources
	// of the devices in Reported.
	Reads    []Read        `json:"reads,omitempty"`
	Reported []string      `json:"reported,omitempty"`
	Window   time.Duration `json:"window,omitempty"`
	// Unexplained are reads reported of pairs the device has no right to
	// read: not counted as reads, shown apart.
	Unexplained []Read    `json:"unexplained_reads,omitempty"`
	At          time.Time `json:"at,omitzero"`
}

// Options refine what the registry alone cannot say.
type Options struct {
	// EnclaveKeyMode lists enclaves whose key server holds an enclave key
	// of its own (DESIGN §3): their pairs' keys come from it, not from the
	// org key, so org key holders, monitors and grants served by the org
	// tier read none of their traffic.
	EnclaveKeyMode []uint32
	// NoDerive lists gateways that hold no pair keys (gateway
	// --no-derive): their grants let them ask servers for SA keys, SA by
	// SA, and they read only the SAs Observed.Delivered names.
	NoDerive []string
	// PairsOnly leaves out what each device reads (Device.Reads): the
	// pairs' readers are all a caller judging assertions needs, and the
	// cross product of devices and pairs is most of a large map's cost.
	PairsOnly bool
}

// Build makes the map from the registry's status and the SAs observed.
func Build(org string, st *api.StatusReply, observed []Observed, opts ...Options) *Map {
	var opt Options
	for _, o := range opts {
		opt.EnclaveKeyMode = append(opt.EnclaveKeyMode, o.EnclaveKeyMode...)
		opt.NoDerive = append(opt.NoDerive, o.NoDerive...)
		opt.PairsOnly = opt.PairsOnly || o.PairsOnly
	}
	m := &Map{Org: org, Layout: st.GetLayout()}
	rules := policyOf(st)
	l := rules.Layout()
	for _, e := range st.GetEnclaves() {
		if e.GetEnclaveKey() { // the registry records it (enclave admin enclave key-mode)
			opt.EnclaveKeyMode = append(opt.EnclaveKeyMode, e.GetId())
		}
		id := keys.EnclaveID(e.GetId())
		m.Enclaves = append(m.Enclaves, Enclave{ID: e.GetId(), Name: e.GetName(), Label: l.Short(id), Level: max(l.Level(id), 1)})
	}
	slices.SortFunc(m.Enclaves, func(a, b Enclave) int { return int(a.ID) - int(b.ID) })
	for i, e := range m.Enclaves {
		m.Enclaves[i].EnclaveKey = slices.Contains(opt.EnclaveKeyMode, uint32(l.TopEnclave(keys.EnclaveID(e.ID))))
	}
	grants := map[string]*api.Grant{}
	for _, g := range st.GetGrants() {
		grants[g.GetDevice()] = g
	}
	for _, d := range st.GetDevices() {
		dev := Device{Name: d.GetName(), Role: d.GetRole(), Enclave: d.GetEnclave(), Revoked: d.GetRevoked(), Pending: d.GetPending()}
		if d.ServerId != nil {
			k := d.GetServerId()
			dev.ServerID = &k
		}
		m.Devices = append(m.Devices, dev)
	}
	slices.SortFunc(m.Devices, func(a, b Device) int { return strings.Compare(a.Name, b.Name) })
	generation := map[registry.Pair]uint32{} // by level-1 pair
	for _, p := range st.GetPairs() {
		generation[rules.Top(apiPair(p.GetPair()))] = p.GetGeneration()
	}
	for i, ea := range m.Enclaves {
		for _, eb := range m.Enclaves[i:] {
			p := Pair{A: ea.ID, B: eb.ID}
			rp := registry.NewPair(keys.EnclaveID(p.A), keys.EnclaveID(p.B))
			p.Name, p.Rule = rules.PairName(rp), rules.Rule(rp)
			p.Assertions = guarding(rules, st.GetAssertions(), rp)
			if p.Allowed = rules.PairAllowed(rp); p.Allowed {
				p.Generation = generation[rules.Top(rp)]
				p.Readers = pairReaders(rules, m.Devices, grants, p.A, p.B)
				if slices.Contains(opt.EnclaveKeyMode, uint32(l.TopEnclave(keys.EnclaveID(p.A)))) || slices.Contains(opt.EnclaveKeyMode, uint32(l.TopEnclave(keys.EnclaveID(p.B)))) {
					// The org key derives none of its keys. Grants and
					// monitors read it where the enclave's own key server
					// (which holds its enclave key) serves them, not where
					// the org tier does: which one this registry is, the
					// map cannot tell.
					p.Readers = slices.DeleteFunc(p.Readers, func(r Reader) bool { return r.Right == RightOrgKey })
					for i, r := range p.Readers {
						if (r.Right == RightMonitor || r.Right == RightGrant) && r.Unsure == "" {
							p.Readers[i].Unsure = "enclave-key mode: only if the enclave's own key server serves its grant"
						}
					}
				}
				for i, r := range p.Readers {
					if r.Right == RightGrant && slices.Contains(opt.NoDerive, r.Device) {
						p.Readers[i].Right = RightMayExchange
					}
				}
				slices.SortStableFunc(p.Readers, func(x, y Reader) int { return rank(x.Right) - rank(y.Right) })
			}
			m.Pairs = append(m.Pairs, p)
		}
	}
	for _, o := range observed {
		s := SA{Enclave: o.Enclave, Peer: o.Peer, Server: o.Server, SPI: o.SPI, Client: o.Client}
		a, b := order(o.Enclave, o.Peer)
		if pi := m.pair(a, b); pi >= 0 {
			m.Pairs[pi].SAs++
			for _, r := range m.Pairs[pi].Readers {
				if r.Right == RightMayExchange {
					continue // only if the SA's keys were delivered (below)
				}
				if r.Right != RightServerKey || m.serves(r.Device, o.Enclave, o.Server) {
					r.Scope = ""
					s.Readers = append(s.Readers, r)
				}
			}
		}
		if o.Client != "" {
			s.Readers = append(s.Readers, Reader{Device: o.Client, Role: m.role(o.Client), Right: RightParty})
		}
		for _, gw := range o.Delivered {
			s.Readers = append(s.Readers, Reader{Device: gw, Role: m.role(gw), Right: RightExchange})
		}
		m.SAs = append(m.SAs, s)
	}
	if !opt.PairsOnly {
		// Each device's reads, from each pair's and SA's readers once (not
		// each reader list per device: a fleet's map in seconds).
		reads := map[string][]string{}
		add := func(rs []Reader, what string) {
			for _, r := range rs {
				if got := reads[r.Device]; len(got) == 0 || got[len(got)-1] != what {
					reads[r.Device] = append(got, what)
				}
			}
		}
		for _, p := range m.Pairs {
			add(p.Readers, "pair "+p.Key())
		}
		for _, s := range m.SAs {
			add(s.Readers, "SA "+s.Key())
		}
		for i := range m.Devices {
			d := &m.Devices[i]
			if d.Reads = reads[d.Name]; d.Reads == nil {
				d.Reads = []string{}
			}
		}
	}
	return m
}

// guarding lists the assertions that guard pair p: always on p itself,
// never and only on p or a pair above it.
func guarding(rules *registry.State, as []*api.Assertion, p registry.Pair) []string {
	var out []string
	for _, a := range as {
		ra := registry.Assertion{Kind: a.GetKind(), Reader: a.GetReader(), Readers: a.GetReaders(), Pair: apiPair(a.GetPair())}
		if ra.Pair == p || (ra.Kind != registry.AssertAlways && registry.Covers(rules.Layout(), ra.Pair, p)) {
			out = append(out, rules.Describe(ra))
		}
	}
	return out
}

// policyOf is the registry's pair rules and layout, from its status.
func policyOf(st *api.StatusReply) *registry.State {
	r := &registry.State{EnclaveLayout: st.GetLayout()}
	if r.CheckLayout() != nil {
		r.EnclaveLayout = "" // not a layout this code reads: every id at level 1
	}
	for _, p := range st.GetPairs() {
		r.Allowed = append(r.Allowed, apiPair(p.GetPair()))
	}
	for _, p := range st.GetForbidden() {
		r.Forbidden = append(r.Forbidden, apiPair(p))
	}
	return r
}

func apiPair(p *api.Pair) registry.Pair {
	return registry.NewPair(keys.EnclaveID(p.GetA()), keys.EnclaveID(p.GetB()))
}

// pairReaders lists who holds a key that opens traffic of pair (a, b):
// revoked devices read nothing new and are left out. A pair key reads the
// pairs beneath it (DESIGN §3a): an enclave key server's level-1 pairs,
// a grant's pair of any level.
func pairReaders(rules *registry.State, devices []Device, grants map[string]*api.Grant, a, b uint32) []Reader {
	top := rules.Top(registry.NewPair(keys.EnclaveID(a), keys.EnclaveID(b)))
	var out []Reader
	for _, d := range devices {
		if d.Revoked {
			continue
		}
		n := len(out)
		g := grants[d.Name]
		switch d.Role {
		case "keyserver":
			switch {
			case d.Enclave == 0:
				out = append(out, Reader{Device: d.Name, Role: d.Role, Right: RightOrgKey})
			case rules.TopEnclave(keys.EnclaveID(d.Enclave)) == top.A || rules.TopEnclave(keys.EnclaveID(d.Enclave)) == top.B:
				out = append(out, Reader{Device: d.Name, Role: d.Role, Right: RightEnclaveTier})
			}
		case "monitor", "gateway":
			switch {
			case g != nil && g.GetAll():
				out = append(out, Reader{Device: d.Name, Role: d.Role, Right: RightMonitor})
			case g != nil && granted(rules, g, a, b):
				out = append(out, Reader{Device: d.Name, Role: d.Role, Right: RightGrant})
			}
		case "server":
			if d.ServerID != nil && (d.Enclave == a || d.Enclave == b) {
				other := b
				if d.Enclave == b {
					other = a
				}
				mine, peer := rules.ID(keys.EnclaveID(d.Enclave)), rules.ID(keys.EnclaveID(other))
				out = append(out, Reader{Device: d.Name, Role: d.Role, Right: RightServerKey, Scope: fmt.Sprintf("SK(%s,%s,%d): the SAs it serves to enclave %s", mine, peer, *d.ServerID, peer)})
			}
		}
		if d.Pending && len(out) > n {
			out[n].Unsure = "its host has not joined (or confirmed) yet"
		}
	}
	slices.SortStableFunc(out, func(x, y Reader) int { return rank(x.Right) - rank(y.Right) })
	return out
}

func rank(right string) int {
	return slices.Index([]string{RightOrgKey, RightMonitor, RightEnclaveTier, RightGrant, RightMayExchange, RightServerKey, RightParty, RightExchange}, right)
}

// granted reports whether a grant's pair, at its level, covers (a, b).
func granted(rules *registry.State, g *api.Grant, a, b uint32) bool {
	p := registry.NewPair(keys.EnclaveID(a), keys.EnclaveID(b))
	for _, q := range g.GetPairs() {
		if registry.Covers(rules.Layout(), apiPair(q), p) {
			return true
		}
	}
	return false
}

func order(a, b uint32) (uint32, uint32) { return min(a, b), max(a, b) }

func (m *Map) pair(a, b uint32) int {
	for i, p := range m.Pairs {
		if p.A == a && p.B == b {
			return i
		}
	}
	return -1
}

// serves reports whether the named server is server k of enclave i.
func (m *Map) serves(name string, i, k uint32) bool {
	for _, d := range m.Devices {
		if d.Name == name {
			return d.Enclave == i && d.ServerID != nil && *d.ServerID == k
		}
	}
	return false
}

// role is the named device's role (m.Devices is sorted by name).
func (m *Map) role(name string) string {
	if i, ok := slices.BinarySearchFunc(m.Devices, name, func(d Device, n string) int { return strings.Compare(d.Name, n) }); ok {
		return m.Devices[i].Role
	}
	return "unregistered"
}

// Readers returns who reads pair a-b (in either order), or nil.
func (m *Map) Readers(a, b uint32) []Reader {
	x, y := order(a, b)
	if i := m.pair(x, y); i >= 0 {
		return m.Pairs[i].Readers
	}
	return nil
}
