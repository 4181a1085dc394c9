package visibility

import (
	"cmp"
	"fmt"
	"io"
	"slices"
	"strings"

	"github.com/enclavekeys/enclave/internal/api"
)

// Access is one device's right to read one pair's traffic.
type Access struct {
	Pair   string `json:"pair"`
	Device string `json:"device"`
	Role   string `json:"role"`
	Right  string `json:"right"`
	// From is the right held before, where only the right changed.
	From string `json:"from,omitempty"`
}

// Diff is what changes between two maps of one organisation: who gains and
// who loses sight of which pairs, whose right changes, which pairs policy
// starts or stops allowing, and which pairs move to a new generation (new
// keys: every SA of the pair re-establishes).
type Diff struct {
	Gained  []Access `json:"gained"`
	Lost    []Access `json:"lost"`
	Changed []Access `json:"changed"`
	// Allowed and Forbidden are pairs policy starts or stops allowing.
	Allowed   []string `json:"allowed"`
	Forbidden []string `json:"forbidden"`
	// Rotated are pairs allowed in both maps whose generation differs.
	Rotated []Rotation `json:"rotated"`
	// EnclavesAdded and DevicesAdded are what the second map has new;
	// DevicesRevoked the devices revoked (or gone) since the first.
	EnclavesAdded  []uint32 `json:"enclaves_added"`
	DevicesAdded   []string `json:"devices_added"`
	DevicesRevoked []string `json:"devices_revoked"`
}

// Rotation is a pair's move from one generation to another.
type Rotation struct {
	Pair string `json:"pair"`
	From uint32 `json:"from"`
	To   uint32 `json:"to"`
}

// CompareStatus is Compare of the maps of two registry statuses (as the
// Status RPC gives them, or a Preview's before and after), with no SAs
// observed: what a registry change does to who can read which pair.
func CompareStatus(before, after *api.StatusReply, opts ...Options) *Diff {
	return Compare(Build("", before, nil, opts...), Build("", after, nil, opts...))
}

// Compare returns what changes from map a to map b (at the level of pairs:
// the SAs observed are not compared).
func Compare(a, b *Map) *Diff {
	d := &Diff{Gained: []Access{}, Lost: []Access{}, Changed: []Access{}, Allowed: []string{}, Forbidden: []string{},
		Rotated: []Rotation{}, EnclavesAdded: []uint32{}, DevicesAdded: []string{}, DevicesRevoked: []string{}}
	before, after := a.accessIndex(), b.accessIndex()
	for k, x := range after {
		switch y, ok := before[k]; {
		case !ok:
			d.Gained = append(d.Gained, x)
		case y.Right != x.Right:
			x.From = y.Right
			d.Changed = append(d.Changed, x)
		}
	}
	for k, y := range before {
		if _, ok := after[k]; !ok {
			d.Lost = append(d.Lost, y)
		}
	}
	pairs := map[string]Pair{}
	for _, p := range a.Pairs {
		pairs[p.Key()] = p
	}
	for _, p := range b.Pairs {
		q, ok := pairs[p.Key()]
		switch {
		case p.Allowed && !(ok && q.Allowed):
			d.Allowed = append(d.Allowed, p.Key())
		case !p.Allowed && ok && q.Allowed:
			d.Forbidden = append(d.Forbidden, p.Key())
		case p.Allowed && q.Generation != p.Generation:
			d.Rotated = append(d.Rotated, Rotation{Pair: p.Key(), From: q.Generation, To: p.Generation})
		}
		delete(pairs, p.Key())
	}
	for k, q := range pairs { // pairs the second map lacks (an enclave gone)
		if q.Allowed {
			d.Forbidden = append(d.Forbidden, k)
		}
	}
	for _, e := range b.Enclaves {
		if !slices.ContainsFunc(a.Enclaves, func(x Enclave) bool { return x.ID == e.ID }) {
			d.EnclavesAdded = append(d.EnclavesAdded, e.ID)
		}
	}
	revokedIn := func(m *Map) map[string]bool { // name -> revoked, for each device
		out := make(map[string]bool, len(m.Devices))
		for _, x := range m.Devices {
			out[x.Name] = x.Revoked
		}
		return out
	}
	inA, inB := revokedIn(a), revokedIn(b)
	for _, x := range b.Devices {
		if _, ok := inA[x.Name]; !x.Revoked && !ok {
			d.DevicesAdded = append(d.DevicesAdded, x.Name)
		}
	}
	for _, x := range a.Devices {
		if revoked, ok := inB[x.Name]; !x.Revoked && (!ok || revoked) {
			d.DevicesRevoked = append(d.DevicesRevoked, x.Name)
		}
	}
	d.sort()
	return d
}

// accessIndex keys every (pair, device) that can read.
func (m *Map) accessIndex() map[[2]string]Access {
	out := map[[2]string]Access{}
	for _, p := range m.Pairs {
		for _, r := range p.Readers {
			right := r.Right
			if r.Unsure != "" {
				right += " (maybe: " + r.Unsure + ")"
			}
			out[[2]string{p.Key(), r.Device}] = Access{Pair: p.Key(), Device: r.Device, Role: r.Role, Right: right}
		}
	}
	return out
}

func (d *Diff) sort() {
	byDevice := func(x, y Access) int {
		return cmp.Or(strings.Compare(x.Device, y.Device), comparePairKeys(x.Pair, y.Pair), strings.Compare(x.Right, y.Right))
	}
	slices.SortFunc(d.Gained, byDevice)
	slices.SortFunc(d.Lost, byDevice)
	slices.SortFunc(d.Changed, byDevice)
	slices.SortFunc(d.Allowed, comparePairKeys)
	slices.SortFunc(d.Forbidden, comparePairKeys)
	slices.SortFunc(d.Rotated, func(x, y Rotation) int { return comparePairKeys(x.Pair, y.Pair) })
	slices.Sort(d.EnclavesAdded)
	slices.Sort(d.DevicesAdded)
	slices.Sort(d.DevicesRevoked)
}

// comparePairKeys orders "A-B" keys by their numbers.
func comparePairKeys(x, y string) int {
	var xa, xb, ya, yb uint32
	fmt.Sscanf(x, "%d-%d", &xa, &xb)
	fmt.Sscanf(y, "%d-%d", &ya, &yb)
	return cmp.Or(cmp.Compare(xa, ya), cmp.Compare(xb, yb), strings.Compare(x, y))
}

// Empty reports whether nothing changes.
func (d *Diff) Empty() bool {
	return len(d.Gained)+len(d.Lost)+len(d.Changed)+len(d.Allowed)+len(d.Forbidden)+len(d.Rotated)+
		len(d.EnclavesAdded)+len(d.DevicesAdded)+len(d.DevicesRevoked) == 0
}

// Group is one device's change of sight by one right: the pairs it gains
// or loses, or whose right changes from From.
type Group struct {
	Change string   `json:"change"` // gains, loses or changes
	Device string   `json:"device"`
	Role   string   `json:"role"`
	Right  string   `json:"right"`
	From   string   `json:"from,omitempty"`
	Pairs  []string `json:"pairs"`
}

// Change names of a Group.
const (
	Gains   = "gains"
	Loses   = "loses"
	Changes = "changes"
)

// Groups folds the diff's accesses by device, right and change, in the
// order losses, changes, gains: what an operator reads first is who loses
// sight (a change that may break monitoring) and who gains it (one that
// widens who reads traffic).
func (d *Diff) Groups() []Group {
	var out []Group
	fold := func(change string, as []Access) {
		for _, a := range as {
			n := len(out)
			if n > 0 && out[n-1].Change == change && out[n-1].Device == a.Device && out[n-1].Right == a.Right && out[n-1].From == a.From {
				out[n-1].Pairs = append(out[n-1].Pairs, a.Pair)
				continue
			}
			out = append(out, Group{Change: change, Device: a.Device, Role: a.Role, Right: a.Right, From: a.From, Pairs: []string{a.Pair}})
		}
	}
	regroup := func(as []Access) []Access { // by device and right, then pair
		as = slices.Clone(as)
		slices.SortStableFunc(as, func(x, y Access) int {
			return cmp.Or(strings.Compare(x.Device, y.Device), rank(x.Right)-rank(y.Right), strings.Compare(x.From, y.From), comparePairKeys(x.Pair, y.Pair))
		})
		return as
	}
	fold(Loses, regroup(d.Lost))
	fold(Changes, regroup(d.Changed))
	fold(Gains, regroup(d.Gained))
	return out
}

// Text writes the diff for a person: one line per device and right, then
// the pairs policy allows or forbids and those that rotate.
func (d *Diff) Text(w io.Writer) error {
	var b strings.Builder
	if d.Empty() {
		b.WriteString("no change in who can read what\n")
	}
	for _, g := range d.Groups() {
		mark := map[string]string{Gains: "+", Loses: "-", Changes: "~"}[g.Change]
		switch g.Change {
		case Changes:
			fmt.Fprintf(&b, "%s %s (%s) reads %s by %s instead of %s\n", mark, g.Device, g.Role, pairList(g.Pairs), g.Right, g.From)
		default:
			fmt.Fprintf(&b, "%s %s (%s) %s sight of %s: %s\n", mark, g.Device, g.Role, g.Change, pairList(g.Pairs), g.Right)
		}
	}
	line := func(label string, items []string) {
		if len(items) > 0 {
			fmt.Fprintf(&b, "%s: %s\n", label, strings.Join(items, " "))
		}
	}
	line("pairs allowed", d.Allowed)
	line("pairs forbidden (their SAs end)", d.Forbidden)
	var rot []string
	for _, r := range d.Rotated {
		rot = append(rot, fmt.Sprintf("%s (generation %d → %d)", r.Pair, r.From, r.To))
	}
	line("pairs that rotate (their SAs re-establish)", rot)
	var encl []string
	for _, e := range d.EnclavesAdded {
		encl = append(encl, fmt.Sprint(e))
	}
	line("enclaves added", encl)
	line("devices added", d.DevicesAdded)
	line("devices revoked", d.DevicesRevoked)
	_, err := io.WriteString(w, b.String())
	return err
}

// pairList says "pair 1-2" or "3 pairs: 1-2 1-3 2-3".
func pairList(ps []string) string {
	if len(ps) == 1 {
		return "pair " + ps[0]
	}
	return fmt.Sprintf("%d pairs (%s)", len(ps), strings.Join(ps, " "))
}
