package keyserver

import (
	"context"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/enclavekeys/enclave/internal/api"
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
	refused("never, broken now", add(&api.Assertion{Kind: "never", Reader: "gw", Pair: pair(3, 7)}), "gw (gateway) would read pair 3-7")
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
	_, err = admin.Preview(ctx, &api.PreviewRequest{Change: &api.PreviewRequest_AddGrant{AddGrant: &api.AddGrantRequest{Device: "gw2", Pairs: []*api.Pair{pair(3, 7)}}}})
	refused("the dry run of it", err, "gw2")

	if err := add(&api.Assertion{Kind: "always", Reader: "ids", Pair: pair(3, 7)}); err != nil {
		t.Fatal(err)
	}
	_, err = admin.RevokeGrant(ctx, &api.RevokeGrantRequest{Device: "ids"})
	refused("withdrawing the monitor's grant", err, "ids would hold no key of pair 3-7")
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
