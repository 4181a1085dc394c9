package registry

import (
	"errors"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/keys"
)

var t0 = time.Date(2026, 11, 25, 0, 0, 0, 0, time.UTC)

func sid(k keys.ServerID) *keys.ServerID { return &k }

// org is two enclaves, a server, a client, a gateway and a monitor, with
// pair 3-7 allowed and the gateway granted it.
func org(t *testing.T) *State {
	t.Helper()
	s := &State{}
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(s.AddEnclave(3, "web"))
	must(s.AddEnclave(7, "db"))
	must(s.AddDevice(Device{Name: "web1", Role: ca.RoleServer, Enclave: 3, ServerID: sid(258)}))
	must(s.AddDevice(Device{Name: "laptop", Role: ca.RoleClient, Enclave: 7}))
	must(s.AddDevice(Device{Name: "gw", Role: ca.RoleGateway}))
	must(s.AddDevice(Device{Name: "ids", Role: ca.RoleMonitor}))
	must(s.AllowPair(7, 3, t0))
	must(s.AddGrant("gw", []Pair{NewPair(3, 7)}, false))
	return s
}

func TestValidation(t *testing.T) {
	s := org(t)
	cases := []struct {
		name string
		err  error
		want error
	}{
		{"enclave 0", s.AddEnclave(0, "x"), ErrInvalid},
		{"bad enclave name", s.AddEnclave(9, "bad name"), ErrInvalid},
		{"duplicate enclave id", s.AddEnclave(3, "other"), ErrExists},
		{"duplicate enclave name", s.AddEnclave(9, "web"), ErrExists},
		{"duplicate device", s.AddDevice(Device{Name: "web1", Role: ca.RoleClient}), ErrExists},
		{"duplicate server id", s.AddDevice(Device{Name: "web2", Role: ca.RoleServer, Enclave: 3, ServerID: sid(258)}), ErrExists},
		{"unknown enclave", s.AddDevice(Device{Name: "x", Role: ca.RoleClient, Enclave: 99}), ErrNotFound},
		{"server without id", s.AddDevice(Device{Name: "x", Role: ca.RoleServer, Enclave: 3}), ErrInvalid},
		{"client with server id", s.AddDevice(Device{Name: "x", Role: ca.RoleClient, ServerID: sid(1)}), ErrInvalid},
		{"bad role", s.AddDevice(Device{Name: "x", Role: "root"}), ErrInvalid},
		{"pair with unknown enclave", s.AllowPair(3, 99, t0), ErrNotFound},
		{"pair twice", s.AllowPair(3, 7, t0), ErrExists},
		{"grant to unknown device", s.AddGrant("nobody", []Pair{NewPair(3, 7)}, false), ErrNotFound},
		{"grant a pair not allowed", s.AddGrant("gw", []Pair{NewPair(3, 3)}, false), ErrNotAllowed},
		{"pair grant to a server", s.AddGrant("web1", []Pair{NewPair(3, 7)}, false), ErrInvalid},
		{"all to a gateway", s.AddGrant("gw", nil, true), ErrInvalid},
		{"empty grant", s.AddGrant("gw", nil, false), ErrInvalid},
		{"revoke unknown", func() error { _, err := s.RevokeDevice("nobody", t0); return err }(), ErrNotFound},
		{"revoke unknown grant", s.RevokeGrant("web1", nil), ErrNotFound},
	}
	for _, c := range cases {
		if !errors.Is(c.err, c.want) {
			t.Errorf("%s: %v, want %v", c.name, c.err, c.want)
		}
	}
	if _, err := ParsePair("3-x"); !errors.Is(err, ErrInvalid) {
		t.Errorf("ParsePair: %v", err)
	}
	if p, err := ParsePair("7-3"); err != nil || p != (Pair{3, 7}) || p.String() != "3-7" {
		t.Errorf("ParsePair(7-3) = %v, %v", p, err)
	}
}

func TestPolicyQueries(t *testing.T) {
	s := org(t)
	if got := s.Peers(3); !slices.Equal(got, []keys.EnclaveID{7}) {
		t.Fatalf("Peers(3) = %v", got)
	}
	if err := s.AllowPair(3, 3, t0); err != nil {
		t.Fatal(err)
	}
	if got := s.Peers(3); !slices.Equal(got, []keys.EnclaveID{3, 7}) {
		t.Fatalf("Peers(3) = %v", got)
	}
	if got := s.GrantedPairs("gw"); !slices.Equal(got, []Pair{{3, 7}}) {
		t.Fatalf("gateway pairs %v", got)
	}
	if err := s.AddGrant("ids", nil, true); err != nil {
		t.Fatal(err)
	}
	if got := s.GrantedPairs("ids"); len(got) != 2 {
		t.Fatalf("monitor pairs %v", got)
	}
	if got := s.GrantedPairs("web1"); got != nil {
		t.Fatalf("a server has grants: %v", got)
	}
	if err := s.RevokeGrant("gw", []Pair{{3, 7}}); err != nil || len(s.GrantedPairs("gw")) != 0 {
		t.Fatalf("revoke grant: %v", err)
	}
}

func TestAuthorize(t *testing.T) {
	s := org(t)
	id := ca.Identity{Org: "o", Name: "web1", Role: ca.RoleServer, Enclave: 3, ServerID: 258, HasServerID: true}
	if d, err := s.Authorize(id, "sha256:x"); err != nil || d.Name != "web1" {
		t.Fatalf("Authorize: %v", err)
	}
	bad := []struct {
		mod  func(*ca.Identity)
		want error
	}{
		{func(i *ca.Identity) { i.Name = "web9" }, ErrNotFound},
		{func(i *ca.Identity) { i.Role = ca.RoleClient; i.HasServerID = false }, ErrMismatch},
		{func(i *ca.Identity) { i.Enclave = 7 }, ErrMismatch},
		{func(i *ca.Identity) { i.ServerID = 259 }, ErrMismatch},
	}
	for _, b := range bad {
		x := id
		b.mod(&x)
		if _, err := s.Authorize(x, ""); !errors.Is(err, b.want) {
			t.Errorf("%+v: %v, want %v", x, err, b.want)
		}
	}
	d, _ := s.Device("web1")
	d.Fingerprint = "sha256:pinned"
	if err := s.SetDevice(d); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Authorize(id, "sha256:other"); !errors.Is(err, ErrMismatch) {
		t.Errorf("pinned certificate: %v", err)
	}
	if _, err := s.RevokeDevice("web1", t0); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Authorize(id, "sha256:pinned"); !errors.Is(err, ErrRevoked) {
		t.Errorf("revoked: %v", err)
	}
}

// TestRotation: immediate, delayed, coalesced, scheduled; the previous
// generation is accepted until rotation + grace; no pair rotates twice
// within grace.
func TestRotation(t *testing.T) {
	s := org(t)
	r := Rotation{Interval: 24 * time.Hour, Grace: time.Hour}
	p := NewPair(3, 7)
	g, _ := s.Generation(p)
	if g.Current != 1 || !slices.Equal(g.Accepted(t0), []keys.Generation{1}) {
		t.Fatalf("initial %+v", g)
	}
	// Within grace of the pair's start: delayed, then coalesced.
	ev, _ := s.RequestRotation(p, "device added", t0.Add(10*time.Minute), r)
	if ev.Outcome != Delayed || !ev.At.Equal(t0.Add(time.Hour)) || ev.Generation != 1 {
		t.Fatalf("first request: %+v", ev)
	}
	ev, _ = s.RequestRotation(p, "grant revoked", t0.Add(20*time.Minute), r)
	if ev.Outcome != Coalesced {
		t.Fatalf("second request: %+v", ev)
	}
	if evs := s.Tick(t0.Add(59*time.Minute), r); len(evs) != 0 {
		t.Fatalf("tick before due: %+v", evs)
	}
	if due := s.NextDue(r); !due.Equal(t0.Add(time.Hour)) {
		t.Fatalf("NextDue %v", due)
	}
	evs := s.Tick(t0.Add(time.Hour), r)
	if len(evs) != 1 || evs[0].Generation != 2 || evs[0].Reason != "device added (delayed)" {
		t.Fatalf("tick at due: %+v", evs)
	}
	g, _ = s.Generation(p)
	at := t0.Add(time.Hour)
	if !slices.Equal(g.Accepted(at.Add(59*time.Minute)), []keys.Generation{2, 1}) || !slices.Equal(g.Accepted(at.Add(time.Hour)), []keys.Generation{2}) {
		t.Fatalf("accepted windows: %+v", g)
	}
	// After grace a request rotates at once.
	ev, _ = s.RequestRotation(p, "admin", at.Add(2*time.Hour), r)
	if ev.Outcome != Rotated || ev.Generation != 3 {
		t.Fatalf("request after grace: %+v", ev)
	}
	// Scheduled rotation after the interval.
	evs = s.Tick(at.Add(26*time.Hour), r)
	if len(evs) != 1 || evs[0].Generation != 4 || evs[0].Reason != "scheduled" {
		t.Fatalf("scheduled: %+v", evs)
	}
	// Never twice within grace, whatever is asked.
	last := at.Add(26 * time.Hour)
	for m := 0; m < 60; m += 5 {
		if ev, _ := s.RequestRotation(p, "storm", last.Add(time.Duration(m)*time.Minute), r); ev.Outcome == Rotated {
			t.Fatalf("rotated again %d minutes after a rotation", m)
		}
	}
	if _, err := s.RequestRotation(NewPair(3, 3), "x", t0, r); !errors.Is(err, ErrNotFound) {
		t.Fatalf("pair without generation: %v", err)
	}
}

func TestRotateEnclave(t *testing.T) {
	s := org(t)
	_ = s.AllowPair(3, 3, t0)
	evs, err := s.RotateEnclave(3, "web1 revoked", t0.Add(2*time.Hour), Rotation{})
	if err != nil || len(evs) != 2 {
		t.Fatalf("%+v %v", evs, err)
	}
	for _, ev := range evs {
		if ev.Outcome != Rotated || ev.Generation != 2 {
			t.Fatalf("%+v", ev)
		}
	}
	if _, err := s.RotateEnclave(42, "x", t0, Rotation{}); !errors.Is(err, ErrNotFound) {
		t.Fatal(err)
	}
}

func TestChanges(t *testing.T) {
	before := org(t)
	after := org(t)
	if rot, rev := after.Changes(before); len(rot) != 0 || len(rev) != 0 {
		t.Fatalf("no change: %v %v", rot, rev)
	}
	_, _ = after.RequestRotation(NewPair(3, 7), "admin", t0.Add(2*time.Hour), Rotation{})
	_, _ = after.RevokeDevice("gw", t0)
	rot, rev := after.Changes(before)
	if len(rot) != 1 || rot[0].Generation != 2 || rot[0].Reason != "admin" || !slices.Equal(rev, []string{"gw"}) {
		t.Fatalf("changes: %+v %v", rot, rev)
	}
}

// TestLeaseSPIs: leases of one server key follow each other without gap
// or overlap; other keys (another server, peer or generation) have their
// own counters; only an allowed pair's current generation is leased; the
// size is bounded; the end of the space gives what is left and then a
// clear error; and marks of retired generations are dropped.
func TestLeaseSPIs(t *testing.T) {
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	var s State
	for _, e := range []keys.EnclaveID{3, 7, 9} {
		if err := s.AddEnclave(e, fmt.Sprint("e", e)); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.AllowPair(3, 7, now); err != nil {
		t.Fatal(err)
	}
	first, n, err := s.LeaseSPIs(3, 7, 258, 1, 100)
	if err != nil || first != 0 || n != 100 {
		t.Fatalf("first lease: %d %d %v", first, n, err)
	}
	if first, n, err = s.LeaseSPIs(3, 7, 258, 1, 50); err != nil || first != 100 || n != 50 {
		t.Fatalf("second lease: %d %d %v", first, n, err)
	}
	if first, _, err = s.LeaseSPIs(3, 7, 259, 1, 10); err != nil || first != 0 {
		t.Fatalf("another server: %d %v", first, err)
	}
	if first, _, err = s.LeaseSPIs(7, 3, 258, 1, 10); err != nil || first != 0 {
		t.Fatalf("server 258 of enclave 7: %d %v", first, err)
	}
	for _, c := range []struct {
		i, j  keys.EnclaveID
		g     keys.Generation
		count uint32
		want  error
	}{
		{3, 9, 1, 10, ErrNotAllowed},
		{3, 7, 2, 10, ErrInvalid},
		{3, 7, 1, 0, ErrInvalid},
		{3, 7, 1, MaxSPILease + 1, ErrInvalid},
	} {
		if _, _, err := s.LeaseSPIs(c.i, c.j, 258, c.g, c.count); !errors.Is(err, c.want) {
			t.Errorf("%d-%d g%d count %d: %v, want %v", c.i, c.j, c.g, c.count, err, c.want)
		}
	}
	l := s.SPILeases.Slice()[0]
	l.Next = SPISpace - 5
	s.SPILeases.Put(l)
	if first, n, err = s.LeaseSPIs(3, 7, 258, 1, 10); err != nil || first != SPISpace-5 || n != 5 {
		t.Fatalf("the last values: %d %d %v", first, n, err)
	}
	if _, _, err = s.LeaseSPIs(3, 7, 258, 1, 10); !errors.Is(err, ErrSPIsExhausted) {
		t.Fatalf("past the end: %v", err)
	}
	// Two rotations later, generation 1's marks go with the next lease.
	r := Rotation{Interval: time.Hour, Grace: time.Minute}
	for k := range 2 {
		if _, err := s.RequestRotation(NewPair(3, 7), "test", now.Add(time.Duration(k+1)*time.Hour), r); err != nil {
			t.Fatal(err)
		}
	}
	for _, k := range []keys.ServerID{258, 259} { // each server's old marks go with its next lease
		if _, _, err = s.LeaseSPIs(3, 7, k, 3, 10); err != nil {
			t.Fatal(err)
		}
	}
	if s.LeasedSPIs(3, 7, 258, 1) != 0 || s.LeasedSPIs(3, 7, 259, 1) != 0 || s.LeasedSPIs(3, 7, 258, 3) != 10 {
		t.Fatalf("marks after two rotations: %+v", s.SPILeases.Slice())
	}
}

// TestRotateNow: --now rotates within grace too (Hurried): the new
// generation from now, the one it replaces accepted for grace, the one
// before it no longer; after grace it is an ordinary rotation. A pending
// delayed rotation is taken by it.
func TestRotateNow(t *testing.T) {
	s := org(t)
	r := Rotation{Interval: 24 * time.Hour, Grace: time.Hour}
	p := NewPair(3, 7)
	if ev, _ := s.RequestRotation(p, "device added", t0.Add(10*time.Minute), r); ev.Outcome != Delayed {
		t.Fatalf("%+v", ev)
	}
	at := t0.Add(20 * time.Minute)
	ev, err := s.RotateNow(p, "key feared lost", at, r)
	if err != nil || ev.Outcome != Rotated || ev.Generation != 2 || !ev.At.Equal(at) {
		t.Fatalf("first --now (generation 1 has no predecessor): %+v %v", ev, err)
	}
	g, _ := s.Generation(p)
	if !g.PendingAt.IsZero() || !slices.Equal(g.Accepted(at), []keys.Generation{2, 1}) {
		t.Fatalf("after --now: %+v", g)
	}
	at2 := at.Add(5 * time.Minute)
	ev, _ = s.RotateNow(p, "again", at2, r)
	g, _ = s.Generation(p)
	if ev.Outcome != Hurried || ev.Generation != 3 || !slices.Equal(g.Accepted(at2), []keys.Generation{3, 2}) || !ev.Outcome.Took() {
		t.Fatalf("--now within grace: %+v, accepted %v", ev, g.Accepted(at2))
	}
	if ev, _ := s.RotateNow(p, "later", at2.Add(2*time.Hour), r); ev.Outcome != Rotated || ev.Generation != 4 {
		t.Fatalf("--now after grace: %+v", ev)
	}
	if _, err := s.RotateNow(NewPair(3, 3), "x", t0, r); !errors.Is(err, ErrNotFound) {
		t.Fatalf("pair without generation: %v", err)
	}
}

// TestRemoveDevice: only a revoked device is removed; its grants go, its
// record stays revoked, and neither its name nor its server id is taken
// by another device.
func TestRemoveDevice(t *testing.T) {
	s := org(t)
	if _, err := s.RemoveDevice("gw"); !errors.Is(err, ErrNotRevoked) {
		t.Fatalf("removing an active device: %v", err)
	}
	if _, err := s.RemoveDevice("nobody"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("removing no device: %v", err)
	}
	for _, n := range []string{"gw", "web1"} {
		if _, err := s.RevokeDevice(n, t0); err != nil {
			t.Fatal(err)
		}
		if d, err := s.RemoveDevice(n); err != nil || !d.Removed || !d.Revoked {
			t.Fatalf("remove %s: %+v %v", n, d, err)
		}
	}
	if len(s.GrantedPairs("gw")) != 0 {
		t.Fatal("a removed gateway keeps its grant")
	}
	if err := s.AddDevice(Device{Name: "gw", Role: ca.RoleGateway}); !errors.Is(err, ErrExists) {
		t.Fatalf("the removed name registered again: %v", err)
	}
	if err := s.AddDevice(Device{Name: "web2", Role: ca.RoleServer, Enclave: 3, ServerID: sid(258)}); !errors.Is(err, ErrExists) {
		t.Fatalf("the removed server's id taken: %v", err)
	}
	if d, _ := s.Device("gw"); !d.Revoked {
		t.Fatal("a removed device is no longer revoked")
	}
}
