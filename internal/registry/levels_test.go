package registry

import (
	"errors"
	"slices"
	"testing"

	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/keys"
)

// subOrg is an org of layout 8.8: enclaves 3 (web 3.1, db 3.2) and 7
// (finance 7.1, 7.2), pair 3-7 allowed, a gateway and a monitor.
func subOrg(t *testing.T) (*State, func(string) keys.EnclaveID, func(string) Pair) {
	t.Helper()
	s := &State{}
	l, _ := keys.ParseLayout("8.8")
	if err := s.SetLayout(l); err != nil {
		t.Fatal(err)
	}
	id := func(x string) keys.EnclaveID {
		t.Helper()
		v, err := l.ParseID(x)
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	pair := func(x string) Pair {
		t.Helper()
		p, err := ParsePairIn(l, x)
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	for _, e := range []struct{ id, name string }{{"3", "corp"}, {"3.1", "web"}, {"3.2", "db"}, {"7", "fin"}, {"7.1", "ledger"}, {"7.2", "pay"}} {
		must(s.AddEnclave(id(e.id), e.name))
	}
	must(s.AllowPair(id("3"), id("7"), t0))
	must(s.AddDevice(Device{Name: "gw", Role: ca.RoleGateway}))
	must(s.AddDevice(Device{Name: "mon", Role: ca.RoleMonitor}))
	return s, id, pair
}

// TestLayoutIsSetAtCreation: the layout is chosen on an empty registry
// and kept after; a sub-enclave needs the enclave it lies in.
func TestLayoutIsSetAtCreation(t *testing.T) {
	s, id, _ := subOrg(t)
	if err := s.SetLayout(keys.Layout{}); !errors.Is(err, ErrInvalid) {
		t.Fatalf("changing the layout of an org with enclaves: %v", err)
	}
	l := s.Layout()
	if err := s.SetLayout(l); err != nil {
		t.Fatalf("setting the same layout again: %v", err)
	}
	if err := s.AddEnclave(id("9.1"), "orphan"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("a sub-enclave of no enclave: %v", err)
	}
	if s.ID(id("3.2")) != "3.2" || s.ID(id("7")) != "7" || s.PairName(NewPair(id("7.1"), id("3"))) != "3-7.1" {
		t.Fatalf("names: %s %s %s", s.ID(id("3.2")), s.ID(id("7")), s.PairName(NewPair(id("7.1"), id("3"))))
	}
	if s.EnclaveLayout != "8.8" {
		t.Fatalf("stored layout %q", s.EnclaveLayout)
	}
	var d State
	if err := d.SetLayout(keys.Layout{}); err != nil || d.EnclaveLayout != "" {
		t.Fatalf("the default layout is stored as nothing: %q, %v", d.EnclaveLayout, err)
	}
	if err := d.SetLayout(l); err != nil {
		t.Fatal(err)
	}
	if err := d.SetLayout(keys.Layout{}); !errors.Is(err, ErrInvalid) {
		t.Fatalf("a chosen layout changed before the first enclave: %v", err)
	}
	// A key server serves a whole level-1 enclave; a server leases SPIs
	// towards registered enclaves only.
	if err := s.AddDevice(Device{Name: "ks31", Role: ca.RoleKeyserver, Enclave: id("3.1")}); !errors.Is(err, ErrInvalid) {
		t.Fatalf("a key server in a sub-enclave: %v", err)
	}
	if _, _, err := s.LeaseSPIs(id("3.1"), id("7.9"), 31, 1, 10); !errors.Is(err, ErrNotFound) {
		t.Fatalf("a lease towards unregistered 7.9: %v", err)
	}
	if _, n, err := s.LeaseSPIs(id("3.1"), id("7.1"), 31, 1, 10); err != nil || n != 10 {
		t.Fatalf("a lease towards 7.1: %d, %v", n, err)
	}
}

// TestSubPairRules: a level-1 allow covers every sub-pair; a forbid
// beneath it refines it; the most specific rule wins either way; servers'
// peers follow.
func TestSubPairRules(t *testing.T) {
	s, id, pair := subOrg(t)
	talks := func(a, b string) bool { return s.PairAllowed(NewPair(id(a), id(b))) }
	for _, c := range [][2]string{{"3.1", "7.2"}, {"3.2", "7.1"}, {"3", "7"}, {"3", "7.2"}} {
		if !talks(c[0], c[1]) {
			t.Fatalf("%s-%s not allowed under 3-7", c[0], c[1])
		}
	}
	if talks("3.1", "3.2") {
		t.Fatal("3.1-3.2 allowed with no rule")
	}
	if err := s.ForbidPair(id("3.1"), id("7.2")); err != nil {
		t.Fatal(err)
	}
	if talks("3.1", "7.2") || !talks("3.2", "7.2") || !talks("3.1", "7.1") {
		t.Fatal("forbidding 3.1-7.2 did not refine 3-7 exactly")
	}
	if !slices.Contains(s.Forbidden, pair("3.1-7.2")) {
		t.Fatalf("no forbid rule: %v", s.Forbidden)
	}
	if got := s.Peers(id("3.1")); !slices.Equal(got, []keys.EnclaveID{id("7"), id("7.1")}) {
		t.Fatalf("peers of 3.1: %v", got)
	}
	// Allowing it again takes the forbid rule away.
	if err := s.AllowPair(id("3.1"), id("7.2"), t0); err != nil || !talks("3.1", "7.2") || len(s.Forbidden) != 0 {
		t.Fatalf("allow again: %v, forbidden %v", err, s.Forbidden)
	}
	if err := s.AllowPair(id("3.1"), id("7.2"), t0); !errors.Is(err, ErrExists) {
		t.Fatalf("allowing a pair 3-7 allows: %v", err)
	}
	// Without 3-7, a sub-pair allowed alone talks and its siblings do not.
	if err := s.AllowPair(id("3.2"), id("3.1"), t0); err != nil {
		t.Fatal(err)
	}
	if err := s.ForbidPair(id("3"), id("7")); err != nil {
		t.Fatal(err)
	}
	if talks("3.1", "7.2") || !talks("3.1", "3.2") || talks("3.1", "3.1") {
		t.Fatal("rules after forbidding 3-7")
	}
	if err := s.ForbidPair(id("3.1"), id("7.1")); !errors.Is(err, ErrNotFound) {
		t.Fatalf("forbidding what nothing allows: %v", err)
	}
	// A sub-pair has its level-1 pair's generation.
	g, ok := s.Generation(pair("3.1-3.2"))
	if !ok || g.Pair != pair("3-3") {
		t.Fatalf("generation of 3.1-3.2: %+v %v", g, ok)
	}
	// The schedule rotates a level-1 pair allowed only beneath.
	if next := s.NextDue(Rotation{}); next.IsZero() {
		t.Fatal("nothing due although 3.1-3.2 is allowed")
	}
	if evs := s.Tick(t0.Add(Rotation{}.WithDefaults().Interval), Rotation{}); len(evs) != 1 || evs[0].Pair != pair("3-3") {
		t.Fatalf("scheduled rotations %+v", evs)
	}
	if _, err := s.RotateNow(pair("3.1-3.2"), "test", t0, Rotation{}); !errors.Is(err, ErrInvalid) {
		t.Fatalf("rotating a sub-pair: %v", err)
	}
	if ev, err := s.RotateNow(pair("3-3"), "test", t0, Rotation{}); err != nil || ev.Generation != 3 {
		t.Fatalf("rotating 3-3: %+v, %v", ev, err)
	}
	if g, _ := s.Generation(pair("3.1-3.2")); g.Current != 3 {
		t.Fatalf("3.1-3.2 did not rotate with 3-3: generation %d", g.Current)
	}
	if s.PairLevel(pair("3.1-7")) != 2 || s.PairLevel(pair("3-7")) != 1 {
		t.Fatal("pair levels")
	}
}

// TestSubPairGrants: a grant names a pair at any level under which
// something is allowed; a monitor's grant of everything is every level-1
// pair with an allowed pair beneath.
func TestSubPairGrants(t *testing.T) {
	s, id, pair := subOrg(t)
	if err := s.AddGrant("gw", []Pair{pair("3.1-7.2")}, false); err != nil {
		t.Fatal(err)
	}
	if err := s.AddGrant("gw", []Pair{pair("3.9-7")}, false); !errors.Is(err, ErrNotFound) {
		t.Fatalf("a grant naming an unregistered sub-enclave: %v", err)
	}
	if err := s.AddGrant("gw", []Pair{pair("3.1-3.2")}, false); !errors.Is(err, ErrNotAllowed) {
		t.Fatalf("a grant of a pair nothing allows: %v", err)
	}
	if err := s.AddGrant("mon", nil, true); err != nil {
		t.Fatal(err)
	}
	if got := s.GrantedPairs("gw"); !slices.Equal(got, []Pair{pair("3.1-7.2")}) {
		t.Fatalf("gateway's pairs %v", got)
	}
	if got := s.GrantedPairs("mon"); !slices.Equal(got, []Pair{pair("3-7")}) {
		t.Fatalf("monitor's pairs %v", got)
	}
	// Forbidding the sub-pair leaves the grant with nothing to read.
	if err := s.ForbidPair(id("3.1"), id("7.2")); err != nil {
		t.Fatal(err)
	}
	if got := s.GrantedPairs("gw"); len(got) != 0 {
		t.Fatalf("gateway's pairs after the forbid %v", got)
	}
	// A level-1 grant over a pair allowed only beneath.
	if err := s.ForbidPair(id("3"), id("7")); err != nil {
		t.Fatal(err)
	}
	if err := s.AllowPair(id("3.2"), id("7.1"), t0); err != nil {
		t.Fatal(err)
	}
	if err := s.AddGrant("gw", []Pair{pair("3-7")}, false); err != nil {
		t.Fatalf("grant of 3-7 with 3.2-7.1 allowed beneath: %v", err)
	}
	if got := s.PairsOf(id("3.2")); !slices.Equal(got, []Pair{pair("3-7")}) {
		t.Fatalf("level-1 pairs of 3.2: %v", got)
	}
	if !Covers(s.Layout(), pair("3-7"), pair("3.2-7.1")) || Covers(s.Layout(), pair("3.1-7"), pair("3.1-7.2")) || !Covers(s.Layout(), pair("3.1-7"), pair("3.1-7")) {
		t.Fatal("Covers")
	}
}
