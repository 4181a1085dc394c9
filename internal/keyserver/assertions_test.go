package keyserver

import (
	"context"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/enclavekeys/enclave/internal/api"
	"github.com/enclavekeys/enclave/internal/visibility"
)

// TestSightAssertions: assertions kept in the registry hold every change
// to them, whichever command makes it (issue 34): never, only and always;
// one that does not hold now is not kept; a dry run refuses as the change
// would; removing an assertion is a change of its own.
func TestSightAssertions(t *testing.T) {
	l := newLab(t)
	admin := setup(t, l) // pair 3-7; gw granted 3-7; ids (monitor) everything; ks3 an enclave tier of 3
	ctx := context.Background()
	pair := func(a, b uint32) *api.Pair { return &api.Pair{A: a, B: b} }
	add := func(a *api.Assertion) error {
		_, err := admin.AddAssertion(ctx, &api.AssertionRequest{Assertion: a})
		return err
	}
	refused := func(what string, err error, wants ...string) {
		t.Helper()
		if status.Code(err) != codes.FailedPrecondition {
			t.Fatalf("%s: %v, want a refusal", what, err)
		}
		for _, w := range wants {
			if !strings.Contains(status.Convert(err).Message(), w) {
				t.Fatalf("%s: %q does not say %q", what, status.Convert(err).Message(), w)
			}
		}
	}
	refused("never, broken now", add(&api.Assertion{Kind: "never", Reader: "gw", Pair: pair(3, 7)}), "does not hold now", "gw (gateway) reads pair 3-7")
	if err := add(&api.Assertion{Kind: "never", Reader: "role:gateway", Pair: pair(3, 9)}); err != nil {
		t.Fatal(err)
	}
	if _, err := admin.AllowPair(ctx, &api.AllowPairRequest{A: 3, B: 9}); err != nil {
		t.Fatal(err)
	}
	_, err := admin.AddGrant(ctx, &api.AddGrantRequest{Device: "gw", Pairs: []*api.Pair{pair(3, 9)}})
	refused("a grant against never", err, "never: {reader: role:gateway, pair: 3-9}", "gw (gateway) would read pair 3-9")

	if err := add(&api.Assertion{Kind: "only", Pair: pair(3, 7), Readers: []string{"gw", "ids"}}); err != nil {
		t.Fatalf("only, holding (servers and key servers aside): %v", err)
	}
	if _, err := admin.AddDevice(ctx, &api.AddDeviceRequest{Name: "gw2", Role: "gateway", Enclave: 7}); err != nil {
		t.Fatal(err)
	}
	_, err = admin.AddGrant(ctx, &api.AddGrantRequest{Device: "gw2", Pairs: []*api.Pair{pair(3, 7)}})
	refused("a grant against only", err, "only: {pair: 3-7, readers: [gw, ids]}", "gw2")
	// Its dry run shows the plan and names the assertion it would break.
	pv, err := admin.Preview(ctx, &api.PreviewRequest{Change: &api.PreviewRequest_AddGrant{AddGrant: &api.AddGrantRequest{Device: "gw2", Pairs: []*api.Pair{pair(3, 7)}}}})
	if err != nil || len(pv.GetBroken()) != 1 || !strings.Contains(pv.GetBroken()[0], "only: {pair: 3-7, readers: [gw, ids]}") || !strings.Contains(pv.GetBroken()[0], "gw2") {
		t.Fatalf("the dry run of it: %v, broken %q", err, pv.GetBroken())
	}

	if err := add(&api.Assertion{Kind: "always", Reader: "ids", Pair: pair(3, 7)}); err != nil {
		t.Fatal(err)
	}
	_, err = admin.RevokeGrant(ctx, &api.RevokeGrantRequest{Device: "ids"})
	refused("withdrawing the monitor's grant", err, "ids would hold no key of pair 3-7")
	// A change to a device alone (judged on a map of that device).
	_, err = admin.RevokeDevice(ctx, &api.RevokeDeviceRequest{Name: "ids"})
	refused("revoking the monitor", err, "ids would hold no key of pair 3-7")
	if _, err := admin.AddDevice(ctx, &api.AddDeviceRequest{Name: "ids2", Role: "monitor"}); err != nil {
		t.Fatalf("a device that breaks nothing: %v", err)
	}
	_, err = admin.ForbidPair(ctx, &api.ForbidPairRequest{A: 3, B: 7})
	refused("forbidding the pair", err, "pair 3-7 would not be allowed")
	refused("always, broken now", add(&api.Assertion{Kind: "always", Reader: "gw2", Pair: pair(3, 7)}), "gw2 would hold no key")

	chk, err := admin.CheckAssertions(ctx, &api.CheckAssertionsRequest{})
	if err != nil || len(chk.GetAssertions()) != 3 || len(chk.GetBroken()) != 0 {
		t.Fatalf("check: %v, %d assertions, broken %v", err, len(chk.GetAssertions()), chk.GetBroken())
	}
	// Removing the assertion is a change of its own; then the grant goes.
	if _, err := admin.RemoveAssertion(ctx, &api.AssertionRequest{Assertion: &api.Assertion{Kind: "always", Reader: "ids", Pair: pair(7, 3)}}); err != nil {
		t.Fatal(err)
	}
	if _, err := admin.RevokeGrant(ctx, &api.RevokeGrantRequest{Device: "ids"}); err != nil {
		t.Fatalf("withdrawing the grant after the assertion went: %v", err)
	}
	for _, bad := range []*api.Assertion{
		{Kind: "sometimes", Reader: "gw", Pair: pair(3, 7)},
		{Kind: "never", Pair: pair(3, 7)},
		{Kind: "never", Reader: "role:pilot", Pair: pair(3, 7)},
		{Kind: "never", Reader: "gw", Pair: pair(3, 12)},
	} {
		if err := add(bad); status.Code(err) != codes.InvalidArgument && status.Code(err) != codes.NotFound {
			t.Errorf("assertion %v: %v", bad, err)
		}
	}
	st, err := admin.Status(ctx, &api.StatusRequest{})
	if err != nil || len(st.GetAssertions()) != 2 {
		t.Fatalf("status: %v, %d assertions", err, len(st.GetAssertions()))
	}
	if !strings.Contains(readFile(t, l.audit), `"rpc":"AddAssertion"`) {
		t.Fatal("adding an assertion is not in the audit log")
	}
}

// TestAssertionsProperty: over random registries and random changes made
// through the admin API, no change the key service takes leaves an
// assertion broken, and every change it refuses for an assertion would
// have broken one (the same change on a copy without the assertions is
// taken, and evaluating them after shows the break).
func TestAssertionsProperty(t *testing.T) {
	r := rand.New(rand.NewPCG(34, 34))
	refusals, taken := 0, 0
	for round := 0; round < 6; round++ {
		l := newLab(t)
		admin := setup(t, l) // enclaves 3, 7, 9; pair 3-7; gw granted 3-7; ids everything
		ctx := context.Background()
		for _, d := range []string{"gw2", "gw3"} {
			if _, err := admin.AddDevice(ctx, &api.AddDeviceRequest{Name: d, Role: "gateway", Enclave: 7}); err != nil {
				t.Fatal(err)
			}
		}
		pairs := []*api.Pair{{A: 3, B: 7}, {A: 3, B: 9}, {A: 7, B: 9}, {A: 3, B: 3}}
		readers := []string{"gw", "gw2", "gw3", "ids", "role:gateway", "role:monitor"}
		pick := func(xs []string) string { return xs[r.IntN(len(xs))] }
		for range 4 { // assertions: those that hold now are kept
			a := &api.Assertion{Kind: []string{"never", "only", "always"}[r.IntN(3)], Pair: pairs[r.IntN(len(pairs))]}
			if a.Kind == "only" {
				a.Readers = []string{pick(readers), pick(readers)}
			} else {
				a.Reader = pick(readers)
			}
			admin.AddAssertion(ctx, &api.AssertionRequest{Assertion: a})
		}
		for step := 0; step < 25; step++ {
			var req *api.PreviewRequest
			p := pairs[r.IntN(len(pairs))]
			gw := pick([]string{"gw", "gw2", "gw3"})
			switch r.IntN(5) {
			case 0:
				req = &api.PreviewRequest{Change: &api.PreviewRequest_AllowPair{AllowPair: &api.AllowPairRequest{A: p.A, B: p.B}}}
			case 1:
				req = &api.PreviewRequest{Change: &api.PreviewRequest_ForbidPair{ForbidPair: &api.ForbidPairRequest{A: p.A, B: p.B}}}
			case 2:
				req = &api.PreviewRequest{Change: &api.PreviewRequest_AddGrant{AddGrant: &api.AddGrantRequest{Device: gw, Pairs: []*api.Pair{p}}}}
			case 3:
				req = &api.PreviewRequest{Change: &api.PreviewRequest_RevokeGrant{RevokeGrant: &api.RevokeGrantRequest{Device: pick([]string{"gw", "gw2", "gw3", "ids"})}}}
			default:
				req = &api.PreviewRequest{Change: &api.PreviewRequest_AddGrant{AddGrant: &api.AddGrantRequest{Device: "ids", All: true}}}
			}
			before, err := l.svc.store.View(ctx)
			if err != nil {
				t.Fatal(err)
			}
			_, err = api.Apply(ctx, admin, req)
			chk, cerr := admin.CheckAssertions(ctx, &api.CheckAssertionsRequest{})
			if cerr != nil || len(chk.GetBroken()) > 0 {
				t.Fatalf("round %d step %d: after %v (%v) the assertions are broken: %v %v", round, step, req, err, chk.GetBroken(), cerr)
			}
			if err == nil {
				taken++
			}
			if !strings.Contains(status.Convert(err).Message(), "sight assertion") {
				continue
			}
			refusals++
			// Refused for an assertion: without the assertions the same
			// change is taken, and it breaks one.
			bare, _ := before.Clone()
			kept := bare.Assertions
			bare.Assertions = nil
			var ch change
			switch x := req.GetChange().(type) {
			case *api.PreviewRequest_AllowPair:
				ch = l.svc.allowPair(x.AllowPair)
			case *api.PreviewRequest_ForbidPair:
				ch = l.svc.forbidPair(x.ForbidPair)
			case *api.PreviewRequest_AddGrant:
				ch = l.svc.addGrant(x.AddGrant)
			case *api.PreviewRequest_RevokeGrant:
				ch = l.svc.revokeGrant(x.RevokeGrant)
			}
			if _, _, err := ch.fn(bare); err != nil {
				t.Fatalf("round %d step %d: refused for an assertion, but fails without them too: %v", round, step, err)
			}
			bare.Assertions = kept
			if len(brokenAssertions(bare, nil)) == 0 {
				t.Fatalf("round %d step %d: %v refused for an assertion it does not break", round, step, req)
			}
		}
	}
	t.Logf("%d changes taken, %d refused for an assertion", taken, refusals)
	if refusals == 0 || taken == 0 {
		t.Fatal("the random changes never met an assertion, or never passed: the test tests nothing")
	}
}

// TestEnclaveKeyModeRecorded: an enclave recorded in enclave-key mode (enclave
// admin enclave key-mode) takes its pairs from the org tier's readers
// (gateway grants, monitors), so that the assertions, the map and the dry
// runs count readers as they are; a change of mode that would break an
// assertion is refused like any other change.
func TestEnclaveKeyModeRecorded(t *testing.T) {
	l := newLab(t)
	admin := setup(t, l) // pair 3-7; gw granted 3-7; ids (monitor) everything; ks3 an enclave tier of 3
	ctx := context.Background()
	mode := func(id uint32, on bool) *api.SetEnclaveKeyModeRequest {
		return &api.SetEnclaveKeyModeRequest{Enclave: id, EnclaveKey: on}
	}
	if _, err := admin.AddAssertion(ctx, &api.AssertionRequest{Assertion: &api.Assertion{Kind: "always", Reader: "ids", Pair: &api.Pair{A: 3, B: 7}}}); err != nil {
		t.Fatal(err)
	}
	pv, err := admin.Preview(ctx, &api.PreviewRequest{Change: &api.PreviewRequest_SetEnclaveKeyMode{SetEnclaveKeyMode: mode(3, true)}})
	if err != nil || len(pv.GetBroken()) != 1 || !strings.Contains(pv.GetBroken()[0], "ids would hold no key of pair 3-7") {
		t.Fatalf("the dry run of enclave-key mode for 3: %v, broken %q", err, pv.GetBroken())
	}
	if _, err := admin.SetEnclaveKeyMode(ctx, mode(3, true)); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("enclave-key mode against always: %v", err)
	}
	if _, err := admin.RemoveAssertion(ctx, &api.AssertionRequest{Assertion: &api.Assertion{Kind: "always", Reader: "ids", Pair: &api.Pair{A: 3, B: 7}}}); err != nil {
		t.Fatal(err)
	}
	if _, err := admin.SetEnclaveKeyMode(ctx, mode(3, true)); err != nil {
		t.Fatal(err)
	}
	// gw's grant and ids's monitor grant read 3-7 only where the
	// enclave's own key server serves them: a never assertion still
	// counts them (it cannot be added), the map marks them unsure and
	// drops the org key's holders, and the enclave tier of 3 reads on.
	never := &api.Assertion{Kind: "never", Reader: "role:gateway", Pair: &api.Pair{A: 3, B: 7}}
	if _, err := admin.AddAssertion(ctx, &api.AssertionRequest{Assertion: never}); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("never a gateway, in enclave-key mode, with a gateway granted: %v", err)
	}
	st, err := admin.Status(ctx, &api.StatusRequest{})
	if err != nil {
		t.Fatal(err)
	}
	m := visibility.Build("", st, nil)
	for _, r := range m.Readers(3, 7) {
		if (r.Device == "gw" || r.Device == "ids") && r.Unsure == "" {
			t.Errorf("%s reads 3-7 surely on the map though 3 is in enclave-key mode", r.Device)
		}
		if r.Right == visibility.RightOrgKey {
			t.Errorf("%s reads 3-7 by the org key though 3 is in enclave-key mode", r.Device)
		}
	}
	if !slices.ContainsFunc(m.Readers(3, 7), func(r visibility.Reader) bool { return r.Device == "ks3" && r.Unsure == "" }) {
		t.Error("the enclave tier of 3, which holds its enclave key, is not a reader of 3-7")
	}
	// Back to the org key: always ids reads 3-7 can be kept again.
	if _, err := admin.SetEnclaveKeyMode(ctx, mode(3, false)); err != nil {
		t.Fatal(err)
	}
	if _, err := admin.AddAssertion(ctx, &api.AssertionRequest{Assertion: &api.Assertion{Kind: "always", Reader: "ids", Pair: &api.Pair{A: 3, B: 7}}}); err != nil {
		t.Fatal(err)
	}
	if _, err := admin.SetEnclaveKeyMode(ctx, mode(12, true)); status.Code(err) != codes.NotFound {
		t.Fatalf("an enclave not registered: %v", err)
	}
	if !strings.Contains(readFile(t, l.audit), `"rpc":"SetEnclaveKeyMode"`) {
		t.Fatal("the mode change is not in the audit log")
	}
}
