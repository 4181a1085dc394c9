package visibility

import (
	"bytes"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/enclavekeys/enclave/internal/api"
	"github.com/enclavekeys/enclave/internal/audit"
)

func accesses(as []Access) []string {
	var out []string
	for _, a := range as {
		s := a.Device + " " + a.Pair + " " + a.Right
		if a.From != "" {
			s += " from " + a.From
		}
		out = append(out, s)
	}
	return out
}

// TestCompare: each kind of change gives and takes the sight the model's
// rights say, and nothing else.
func TestCompare(t *testing.T) {
	pair := func(a, b uint32) *api.Pair { return &api.Pair{A: a, B: b} }
	cases := []struct {
		name                   string
		change                 func(st *api.StatusReply)
		gained, lost, changed  []string
		allowed, forbidden     []string
		rotated                []Rotation
		enclaves               []uint32
		devicesAdd, devicesRev []string
	}{
		{name: "nothing", change: func(*api.StatusReply) {}},
		{name: "grant a gateway a pair", change: func(st *api.StatusReply) {
			st.Grants[0].Pairs = append(st.Grants[0].Pairs, pair(2, 3))
		}, gained: []string{"gw12 2-3 " + RightGrant}},
		{name: "grant a gateway everything", change: func(st *api.StatusReply) {
			st.Grants[0] = &api.Grant{Device: "gw12", All: true}
		}, changed: []string{"gw12 1-2 " + RightMonitor + " from " + RightGrant},
			gained: []string{"gw12 1-3 " + RightMonitor, "gw12 2-3 " + RightMonitor, "gw12 2-4 " + RightMonitor, "gw12 4-4 " + RightMonitor}},
		{name: "allow a pair", change: func(st *api.StatusReply) {
			st.Pairs = append(st.Pairs, &api.PairStatus{Pair: pair(3, 4), Generation: 1})
		}, allowed: []string{"3-4"}, gained: []string{"db1 3-4 " + RightServerKey, "ks-org 3-4 " + RightOrgKey, "soc 3-4 " + RightMonitor}},
		{name: "forbid a pair", change: func(st *api.StatusReply) {
			st.Pairs = slices.DeleteFunc(st.Pairs, func(p *api.PairStatus) bool { return p.Pair.A == 2 && p.Pair.B == 3 })
		}, forbidden: []string{"2-3"}, lost: []string{"app1 2-3 " + RightServerKey, "db1 2-3 " + RightServerKey, "ks-2 2-3 " + RightEnclaveTier,
			"ks-org 2-3 " + RightOrgKey, "legacy 2-3 " + RightGrant, "soc 2-3 " + RightMonitor}},
		{name: "revoke an enclave key server", change: func(st *api.StatusReply) {
			st.Devices[1].Revoked = true
			st.Pairs[0].Generation++
		}, lost: []string{"ks-2 1-2 " + RightEnclaveTier, "ks-2 2-3 " + RightEnclaveTier, "ks-2 2-4 " + RightEnclaveTier},
			rotated: []Rotation{{"1-2", 3, 4}}, devicesRev: []string{"ks-2"}},
		{name: "add a server", change: func(st *api.StatusReply) {
			st.Devices = append(st.Devices, &api.Device{Name: "ops1", Role: "server", Enclave: 4, ServerId: u32(40)})
		}, gained: []string{"ops1 2-4 " + RightServerKey, "ops1 4-4 " + RightServerKey}, devicesAdd: []string{"ops1"}},
		{name: "add an org key server", change: func(st *api.StatusReply) {
			st.Devices = append(st.Devices, &api.Device{Name: "ks-b", Role: "keyserver"})
		}, gained: []string{"ks-b 1-2 " + RightOrgKey, "ks-b 1-3 " + RightOrgKey, "ks-b 2-3 " + RightOrgKey, "ks-b 2-4 " + RightOrgKey, "ks-b 4-4 " + RightOrgKey},
			devicesAdd: []string{"ks-b"}},
		{name: "add an enclave", change: func(st *api.StatusReply) {
			st.Enclaves = append(st.Enclaves, &api.Enclave{Id: 5, Name: "new"})
		}, enclaves: []uint32{5}},
		{name: "a client reads no pair", change: func(st *api.StatusReply) {
			st.Devices = append(st.Devices, &api.Device{Name: "phone", Role: "client", Enclave: 3})
		}, devicesAdd: []string{"phone"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			before := fig1A()
			after := proto.Clone(before).(*api.StatusReply)
			c.change(after)
			d := Compare(Build("o", before, nil), Build("o", after, nil))
			check := func(what string, got, want []string) {
				t.Helper()
				if len(got) == 0 && len(want) == 0 {
					return
				}
				if !slices.Equal(got, want) {
					t.Errorf("%s:\n got %q\nwant %q", what, got, want)
				}
			}
			check("gained", accesses(d.Gained), c.gained)
			check("lost", accesses(d.Lost), c.lost)
			check("changed", accesses(d.Changed), c.changed)
			check("allowed", d.Allowed, c.allowed)
			check("forbidden", d.Forbidden, c.forbidden)
			check("devices added", d.DevicesAdded, c.devicesAdd)
			check("devices revoked", d.DevicesRevoked, c.devicesRev)
			if !slices.Equal(d.Rotated, c.rotated) && len(d.Rotated)+len(c.rotated) > 0 {
				t.Errorf("rotated %v, want %v", d.Rotated, c.rotated)
			}
			if !slices.Equal(d.EnclavesAdded, c.enclaves) && len(d.EnclavesAdded)+len(c.enclaves) > 0 {
				t.Errorf("enclaves added %v, want %v", d.EnclavesAdded, c.enclaves)
			}
			if (c.name == "nothing") != d.Empty() {
				t.Errorf("Empty() = %v", d.Empty())
			}
			// The reverse change undoes it: gains and losses swap.
			back := Compare(Build("o", after, nil), Build("o", before, nil))
			check("reverse gained", accesses(back.Gained), accesses(d.Lost))
			check("reverse lost", accesses(back.Lost), accesses(d.Gained))
		})
	}
}

// TestDiffText: one line per device and right, losses first, the pairs
// policy changes and the rotations after.
func TestDiffText(t *testing.T) {
	before := fig1A()
	after := proto.Clone(before).(*api.StatusReply)
	after.Grants[0].Pairs = append(after.Grants[0].Pairs, &api.Pair{A: 2, B: 3}, &api.Pair{A: 1, B: 3})
	after.Devices[1].Revoked = true
	after.Pairs[0].Generation++
	var b bytes.Buffer
	if err := Compare(Build("o", before, nil), Build("o", after, nil)).Text(&b); err != nil {
		t.Fatal(err)
	}
	want := "- ks-2 (keyserver) loses sight of 3 pairs (1-2 2-3 2-4): " + RightEnclaveTier + "\n" +
		"+ gw12 (gateway) gains sight of 2 pairs (1-3 2-3): " + RightGrant + "\n" +
		"pairs that rotate (their SAs re-establish): 1-2 (generation 3 → 4)\n" +
		"devices revoked: ks-2\n"
	if b.String() != want {
		t.Errorf("text:\n%s\nwant\n%s", b.String(), want)
	}
	b.Reset()
	Compare(Build("o", before, nil), Build("o", before, nil)).Text(&b)
	if !strings.Contains(b.String(), "no change") {
		t.Errorf("an empty diff says %q", b.String())
	}
}

// TestReplay: sight entries played in order give the readers at each
// moment; a voided change's entries count for nothing, nor do those of a
// change the chain of committed changes leaves out (its commit lost in a
// crash); entries without a change name are counted as unrecorded.
func TestReplay(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	sight := func(min int, change, how, dev, right string, pairs ...string) audit.Entry {
		return audit.Entry{Time: t0.Add(time.Duration(min) * time.Minute), RPC: "sight", Decision: audit.Allow, Change: change,
			IDs: &audit.IDs{Device: dev, Pairs: pairs}, Sight: &audit.Sight{Change: how, Device: dev, Role: "gateway", Right: right}}
	}
	// change is a change's own entry, naming the one committed before it.
	change := func(min int, name, follows string) audit.Entry {
		return audit.Entry{Time: t0.Add(time.Duration(min) * time.Minute), RPC: "AddGrant", Decision: audit.Allow, Change: name, Follows: follows}
	}
	r := NewReplay()
	for _, e := range []audit.Entry{
		{Time: t0, RPC: "AddGrant", Decision: audit.Allow}, // before sight was recorded
		change(1, "a", ""),
		sight(1, "a", Gains, "gw", RightGrant, "1-2", "2-3"),
		sight(1, "a", Gains, "ks", RightOrgKey, "1-2"),
		change(2, "b", "a"),
		sight(2, "b", Gains, "soc", RightMonitor, "1-2"), // voided below
		change(3, "c", "a"),
		sight(3, "c", Loses, "gw", RightGrant, "2-3"),
		change(4, "d", "c"),
		sight(4, "d", Changes, "gw", RightMonitor, "1-2"),
		{Time: t0.Add(5 * time.Minute), RPC: "AddGrant", Decision: audit.Deny, Voids: []string{"b"}},
		// x's entries were written, then the key service was killed
		// before x was committed; it started again with d the last.
		change(6, "x", "d"),
		sight(6, "x", Gains, "intruder", RightGrant, "1-2"),
		{Time: t0.Add(7 * time.Minute), RPC: "start", Decision: audit.Allow, Follows: "d"},
	} {
		r.Add(e)
	}
	if r.Unrecorded != 1 {
		t.Errorf("unrecorded %d, want 1", r.Unrecorded)
	}
	// Until the start says otherwise, the last change written counts as
	// committed (a live key service writes voids for what it did not
	// commit).
	live := NewReplay()
	for _, e := range []audit.Entry{change(1, "a", ""), sight(1, "a", Gains, "gw", RightGrant, "1-2")} {
		live.Add(e)
	}
	if got := names(live.At(t0.Add(time.Hour))["1-2"]); !slices.Equal(got, []string{"gw=" + RightGrant}) {
		t.Errorf("the last change written: %q", got)
	}
	at := func(min int, pair string) []string {
		return names(r.At(t0.Add(time.Duration(min) * time.Minute))[pair])
	}
	for _, c := range []struct {
		min  int
		pair string
		want []string
	}{
		{0, "1-2", nil},
		{1, "1-2", []string{"ks=" + RightOrgKey, "gw=" + RightGrant}},
		{2, "1-2", []string{"ks=" + RightOrgKey, "gw=" + RightGrant}}, // soc's change was voided
		{2, "2-3", []string{"gw=" + RightGrant}},
		{3, "2-3", nil},
		{4, "1-2", []string{"ks=" + RightOrgKey, "gw=" + RightMonitor}},
		{8, "1-2", []string{"ks=" + RightOrgKey, "gw=" + RightMonitor}}, // x's commit was lost
	} {
		if got := at(c.min, c.pair); !slices.Equal(got, c.want) {
			t.Errorf("minute %d pair %s: %q, want %q", c.min, c.pair, got, c.want)
		}
	}
}

// TestDiffPage: a map read back from its JSON compares equal to itself;
// the diff page marks each pair by what changes on it and fetches nothing.
func TestDiffPage(t *testing.T) {
	before := Build("o", fig1A(), nil)
	var js bytes.Buffer
	if err := before.JSON(&js); err != nil {
		t.Fatal(err)
	}
	back, err := ReadMap(&js)
	if err != nil {
		t.Fatal(err)
	}
	if d := Compare(before, back); !d.Empty() {
		t.Fatalf("a map read back differs from itself: %+v", d)
	}
	st := fig1A()
	st.Grants[0].Pairs = append(st.Grants[0].Pairs, &api.Pair{A: 2, B: 3})                    // 2-3 gains gw12
	st.Pairs = st.Pairs[:len(st.Pairs)-1]                                                     // 4-4 forbidden
	st.Pairs[1].Generation++                                                                  // 1-3 rotates
	st.Devices = append(st.Devices, &api.Device{Name: "ks-4", Role: "keyserver", Enclave: 4}) // 2-4 gains ks-4
	st.Devices[1].Revoked = true                                                              // ks-2 loses 1-2, 2-3, 2-4
	var b bytes.Buffer
	if err := DiffHTML(&b, before, Build("o", st, nil)); err != nil {
		t.Fatal(err)
	}
	page := b.String()
	for _, want := range []string{`class="edge both" data-pair="2-3"`, `class="edge both" data-pair="2-4"`, `class="edge lost" data-pair="1-2"`,
		`class="edge forbidden" data-pair="4-4"`, `class="edge rotated" data-pair="1-3"`} {
		if !strings.Contains(page, want) {
			t.Errorf("the page lacks %s", want)
		}
	}
	if re := regexp.MustCompile(`(?i)(src|href)\s*=|@import|url\(|fetch\(`); re.MatchString(page) {
		t.Errorf("the diff page refers elsewhere: %s", re.FindString(page))
	}
	for _, bad := range []string{"", "{", `{"pairs":[{"a":3,"b":1}]}`, `{"unknown":1}`} {
		if _, err := ReadMap(strings.NewReader(bad)); err == nil {
			t.Errorf("ReadMap(%q) took it", bad)
		}
	}
}

// FuzzReadMap: any input is a map or an error, never a panic; a map read
// compares with itself as empty.
func FuzzReadMap(f *testing.F) {
	var js bytes.Buffer
	Build("o", fig1A(), nil).JSON(&js)
	f.Add(js.Bytes())
	f.Add([]byte(`{"pairs":[{"a":1,"b":1,"allowed":true,"readers":[{"device":"x","right":"org key"}]}]}`))
	f.Add([]byte(`null`))
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := ReadMap(bytes.NewReader(b))
		if err != nil {
			return
		}
		if d := Compare(m, m); !d.Empty() {
			t.Fatalf("a map differs from itself: %+v", d)
		}
		var out bytes.Buffer
		if err := DiffHTML(&out, m, m); err != nil {
			t.Fatal(err)
		}
	})
}

// TestReads: reads in the window are summed by device and pair, older
// ones left out; a reported reader by grant that read nothing of a pair
// is a candidate, one not reported is not judged, and rights that no
// grant gives (keys of a key server, a server's own) never are.
func TestReads(t *testing.T) {
	at := time.Date(2026, 12, 2, 12, 0, 0, 0, time.UTC)
	m := Build("o", fig1A(), nil)
	m.AddReads(at, 15*time.Minute, []string{"gw12", "soc", "web1", "ks-org"}, []Read{
		{Device: "gw12", Pair: "1-2", Bytes: 100, Last: at.Add(-time.Minute)},
		{Device: "gw12", Pair: "1-2", Bytes: 50, Last: at.Add(-2 * time.Minute)},
		{Device: "soc", Pair: "1-2", Bytes: 10, Last: at.Add(-20 * time.Minute)}, // before the window
		{Device: "soc", Pair: "2-3", Bytes: 0, Last: at},                         // nothing read
		{Device: "soc", Pair: "2-4", Bytes: 7, Last: at.Add(-time.Second)},
	})
	if len(m.Reads) != 2 || m.Reads[0] != (Read{Device: "gw12", Pair: "1-2", Bytes: 150, Last: at.Add(-time.Minute)}) || m.Reads[1].Device != "soc" || m.Reads[1].Pair != "2-4" {
		t.Fatalf("reads %+v", m.Reads)
	}
	got := accesses(m.Unread())
	want := []string{"soc 1-2 " + RightMonitor, "soc 1-3 " + RightMonitor, "soc 2-3 " + RightMonitor, "soc 4-4 " + RightMonitor}
	if !slices.Equal(got, want) {
		t.Errorf("unread:\n got %q\nwant %q", got, want)
	}
	// legacy (granted 2-3) is not reported: not judged.
	if slices.ContainsFunc(got, func(s string) bool { return strings.HasPrefix(s, "legacy ") }) {
		t.Error("a reader not reported is judged")
	}
}

// TestCompareOptions: what the registry does not hold changes sight too:
// an enclave moving to an enclave key of its own takes the org key's
// sight of its pairs, and leaves grants reading them only where its own
// key server serves them (a change of right); a gateway that stops deriving reads its
// grant's SAs only by key exchange (a change of right).
func TestCompareOptions(t *testing.T) {
	now := Build("o", fig1A(), nil)
	d := Compare(now, Build("o", fig1A(), nil, Options{EnclaveKeyMode: []uint32{4}}))
	want := []string{"ks-org 2-4 " + RightOrgKey, "ks-org 4-4 " + RightOrgKey}
	maybe := " (maybe: enclave-key mode: only if the enclave's own key server serves its grant) from " + RightMonitor
	if got := accesses(d.Lost); !slices.Equal(got, want) || len(d.Gained) != 0 || !slices.Equal(accesses(d.Changed), []string{"soc 2-4 " + RightMonitor + maybe, "soc 4-4 " + RightMonitor + maybe}) {
		t.Errorf("enclave 4 in enclave-key mode: lost %q (want %q), gained %q, changed %q", got, want, accesses(d.Gained), accesses(d.Changed))
	}
	d = Compare(now, Build("o", fig1A(), nil, Options{NoDerive: []string{"legacy"}}))
	if got := accesses(d.Changed); !slices.Equal(got, []string{"legacy 2-3 " + RightMayExchange + " from " + RightGrant}) || len(d.Lost)+len(d.Gained) != 0 {
		t.Errorf("legacy without pair keys: changed %q, lost %q, gained %q", got, accesses(d.Lost), accesses(d.Gained))
	}
}

// TestReadsWithoutRight (issue 31): a read reported of a pair the device
// has no right to is not a read (it would keep a gateway off the "can
// read, never did" list, or hide a leak); it is shown apart, and every
// read names its source on the page.
func TestReadsWithoutRight(t *testing.T) {
	at := time.Date(2026, 12, 2, 12, 0, 0, 0, time.UTC)
	m := Build("o", fig1A(), nil)
	m.AddReads(at, 15*time.Minute, []string{"gw12"}, []Read{
		{Device: "gw12", Pair: "1-2", Bytes: 100, Last: at.Add(-time.Minute), Source: "flow log a.jsonl"},
		{Device: "gw12", Pair: "3-4", Bytes: 100, Last: at.Add(-time.Minute), Source: "flow log a.jsonl"},
	})
	if len(m.Reads) != 1 || m.Reads[0].Pair != "1-2" || len(m.Unexplained) != 1 || m.Unexplained[0].Pair != "3-4" {
		t.Fatalf("reads %+v, unexplained %+v", m.Reads, m.Unexplained)
	}
	var out bytes.Buffer
	if err := m.HTML(&out); err != nil {
		t.Fatal(err)
	}
	if page := out.String(); !strings.Contains(page, "reported by flow log a.jsonl") || !strings.Contains(page, "Reported reading without a right (1)") {
		t.Fatal("the page does not show the reads' sources and the read without a right")
	}
}
