package keyserver

import (
	"bytes"
	"context"
	"os"
	"slices"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/enclavekeys/enclave/internal/api"
	"github.com/enclavekeys/enclave/internal/audit"
	"github.com/enclavekeys/enclave/internal/ca"
	keyspkg "github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/orgfile"
	"github.com/enclavekeys/enclave/internal/registry"
	"github.com/enclavekeys/enclave/internal/visibility"
)

// TestApplyOrg: the organisation file round-trips (export, apply, export
// gives the same bytes); a changed file's dry run answers its plan and
// changes nothing; applying it makes the registry what it says, in one
// audited change; a file that breaks an assertion, or asks what a file
// cannot do, changes nothing at all.
func TestApplyOrg(t *testing.T) {
	l := newLab(t)
	admin := setup(t, l)
	ctx := context.Background()
	export := func() []byte {
		t.Helper()
		st, err := admin.Status(ctx, &api.StatusRequest{})
		if err != nil {
			t.Fatal(err)
		}
		f, err := orgfile.FromStatus(st)
		if err != nil {
			t.Fatal(err)
		}
		raw, err := orgfile.Marshal(f)
		if err != nil {
			t.Fatal(err)
		}
		return raw
	}
	apply := func(raw []byte, dry bool) (*api.ApplyOrgReply, error) {
		return api.ApplyOrgFile(ctx, admin, &api.ApplyOrgRequest{File: raw, DryRun: dry})
	}
	if _, err := admin.AddAssertion(ctx, &api.AssertionRequest{Assertion: &api.Assertion{Kind: "never", Reader: "role:gateway", Pair: &api.Pair{A: 3, B: 9}}}); err != nil {
		t.Fatal(err)
	}
	first := export()
	r, err := apply(first, false)
	if err != nil || len(r.GetPlan()) != 0 || !bytes.Equal(export(), first) {
		t.Fatalf("applying the export: %v, plan %v; the export changed: %v", err, r.GetPlan(), !bytes.Equal(export(), first))
	}

	changed := strings.Replace(string(first), "  - id: \"9\"\n    name: lab\n", "  - id: \"9\"\n    name: lab\n  - id: \"12\"\n    name: new\n", 1)
	changed = strings.Replace(changed, "pairs:\n  allow:\n    - 3-7\n", "pairs:\n  allow:\n    - 3-7\n    - 3-12\n", 1)
	changed = strings.Replace(changed, "devices:\n", "devices:\n  - name: srv12\n    role: server\n    enclave: \"12\"\n    server_id: 1200\n", 1)
	// A device left out is refused (a file cut short must not cut it
	// off); one listed revoked is revoked.
	if _, err := apply([]byte(strings.Replace(changed, "  - name: laptop\n    role: client\n    enclave: \"7\"\n", "", 1)), true); status.Code(err) != codes.InvalidArgument || !strings.Contains(status.Convert(err).Message(), "devices laptop are registered but not in the file") {
		t.Fatalf("a device left out: %v", err)
	}
	changed = strings.Replace(changed, "  - name: laptop\n    role: client\n    enclave: \"7\"\n", "  - name: laptop\n    role: client\n    enclave: \"7\"\n    revoked: true\n", 1)
	if changed == string(first) || !strings.Contains(changed, "revoked: true") {
		t.Fatalf("the test's edits did not take:\n%s", changed)
	}
	dry, err := apply([]byte(changed), true)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"+ enclave 12 (new)", "+ device srv12 (server): a join token for its host, until ", "- device laptop: revoked", "+ pair allow 3-12"} {
		if !slices.ContainsFunc(dry.GetPlan(), func(l string) bool { return strings.HasPrefix(l, want) }) {
			t.Errorf("the plan lacks %q: %q", want, dry.GetPlan())
		}
	}
	if len(dry.GetTokens()) != 0 {
		t.Errorf("a dry run gave join tokens: %v", dry.GetTokens())
	}
	if !bytes.Equal(export(), first) {
		t.Fatal("a dry run changed the registry")
	}
	if r, err := apply([]byte(changed), false); err != nil || len(r.GetTokens()) != 1 || r.GetTokens()[0].GetDevice() != "srv12" {
		t.Fatalf("apply: %v, tokens %v", err, r.GetTokens())
	}
	after := string(export())
	if !strings.Contains(after, "name: srv12") || !strings.Contains(after, "- 3-12") || !strings.Contains(after, "name: laptop\n    role: client\n    enclave: \"7\"\n    revoked: true") {
		t.Fatalf("the registry after apply:\n%s", after)
	}
	if !strings.Contains(readFile(t, l.audit), `"rpc":"ApplyOrg"`) {
		t.Fatal("the apply is not in the audit log")
	}

	// All or nothing: a new enclave with a grant the assertion forbids.
	now := export()
	bad := strings.Replace(string(now), "  - id: \"12\"\n    name: new\n", "  - id: \"12\"\n    name: new\n  - id: \"13\"\n    name: more\n", 1)
	bad = strings.Replace(bad, "pairs:\n  allow:\n", "pairs:\n  allow:\n    - 3-9\n", 1)
	bad = strings.Replace(bad, "  - device: gw\n    pairs:\n      - 3-7\n", "  - device: gw\n    pairs:\n      - 3-7\n      - 3-9\n", 1)
	if dry, err := apply([]byte(bad), true); err != nil || len(dry.GetBroken()) != 1 || !strings.Contains(dry.GetBroken()[0], "never: {reader: role:gateway, pair: 3-9}: gw (gateway) would read pair 3-9") {
		t.Fatalf("the dry run of a file breaking an assertion: %v, broken %q", err, dry.GetBroken())
	}
	_, err = apply([]byte(bad), false)
	if status.Code(err) != codes.FailedPrecondition || !strings.Contains(status.Convert(err).Message(), "never: {reader: role:gateway, pair: 3-9}") {
		t.Fatalf("a file breaking an assertion: %v\n%s", err, bad)
	}
	if !bytes.Equal(export(), now) {
		t.Fatal("a refused apply changed the registry")
	}
	// What a file cannot do.
	for name, edit := range map[string][2]string{
		"an enclave removed": {"  - id: \"9\"\n    name: lab\n", ""},
		"an enclave renamed": {"name: lab", "name: playground"},
		"a role changed":     {"  - name: srv12\n    role: server", "  - name: srv12\n    role: client"},
		"a device back":      {"    revoked: true\n", ""},
	} {
		f := strings.Replace(string(now), edit[0], edit[1], 1)
		if _, err := apply([]byte(f), true); status.Code(err) != codes.InvalidArgument {
			t.Errorf("%s: %v", name, err)
		}
	}
	if _, err := apply([]byte("enclaves: [\n"), true); status.Code(err) != codes.InvalidArgument {
		t.Errorf("a file that does not parse: %v", err)
	}
	// A grant changed pair by pair: a pair added rotates nothing, a pair
	// withdrawn rotates that pair only; the pair kept goes on.
	wider := strings.Replace(string(now), "  - device: gw\n    pairs:\n      - 3-7\n", "  - device: gw\n    pairs:\n      - 3-7\n      - 3-12\n", 1)
	if r, err := apply([]byte(wider), false); err != nil || !slices.Equal(r.GetPlan(), []string{"+ grant of gw: 3-12"}) || len(r.GetRotations()) != 0 {
		t.Fatalf("a pair added to a grant: %v, plan %q, rotations %v", err, r.GetPlan(), r.GetRotations())
	}
	r, err = apply(now, false)
	if err != nil || !slices.Equal(r.GetPlan(), []string{"- grant of gw: 3-12"}) || len(r.GetRotations()) != 1 || r.GetRotations()[0].GetPair().GetB() != 12 {
		t.Fatalf("a pair withdrawn from a grant: %v, plan %q, rotations %v", err, r.GetPlan(), r.GetRotations())
	}
	// Enclave-key mode is in the file, both ways.
	keyed := strings.Replace(string(now), "    name: new\n", "    name: new\n    key_mode: enclave\n", 1)
	if r, err := apply([]byte(keyed), false); err != nil || !slices.Contains(r.GetPlan(), "~ enclave 12: enclave-key mode") {
		t.Fatalf("enclave-key mode from the file: %v, plan %q", err, r.GetPlan())
	}
	if got := string(export()); got != keyed {
		t.Fatalf("the export after enclave-key mode differs from the file applied:\n%s\n---\n%s", got, keyed)
	}
	if r, err := apply(now, false); err != nil || !slices.Contains(r.GetPlan(), "~ enclave 12: keys from the org key") {
		t.Fatalf("back to the org key: %v, plan %q", err, r.GetPlan())
	}
	// One apply withdraws gw's grant and asserts gw never reads 3-7: the
	// audit's history of the assertion shows no break while it was kept
	// (the change's moment ends the one and begins the other).
	cut := strings.Replace(string(now), "  - device: gw\n    pairs:\n      - 3-7\n", "", 1)
	cut = strings.Replace(cut, "assertions:\n", "assertions:\n  - never: {reader: gw, pair: 3-7}\n", 1)
	if _, err := apply([]byte(cut), false); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(l.audit)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	rp := visibility.NewReplay()
	if _, err := audit.Walk(f, rp.Add); err != nil {
		t.Fatal(err)
	}
	h := rp.History(keyspkg.Layout{}, registry.Assertion{Kind: registry.AssertNever, Reader: "gw", Pair: registry.NewPair(3, 7)})
	if len(h.Kept) != 1 || len(h.Broken) == 0 || slices.ContainsFunc(h.Broken, func(b visibility.Breach) bool { return b.WhileKept }) {
		t.Fatalf("the history of an assertion kept by the change that ended its break: %+v", h)
	}
}

// TestApplyOrgJoins: devices an org file adds without a pinned
// certificate are registered awaiting their hosts, each with a join token
// given once; their grants and the sight assertions count them at once; a
// host joins with its token as with one of enclave admin token create;
// the same file applied again changes nothing, before and after the join.
func TestApplyOrgJoins(t *testing.T) {
	l := issuingLab(t)
	admin := l.client(ca.Identity{Name: "alice", Role: ca.RoleAdmin})
	ctx := context.Background()
	file := `enclaves:
  - id: "3"
    name: web
  - id: "7"
    name: db
pairs:
  allow: [3-7]
devices:
  - name: web5
    role: server
    enclave: "3"
    server_id: 305
    address: 100.64.3.5/16
  - name: gwx
    role: gateway
    enclave: "3"
grants:
  - device: gwx
    pairs: [3-7]
assertions:
  - only: {pair: 3-7, readers: [gw-audit]}
`
	apply := func(f string, dry bool) (*api.ApplyOrgReply, error) {
		return api.ApplyOrgFile(ctx, admin, &api.ApplyOrgRequest{File: []byte(f), DryRun: dry, TokenTtlSeconds: 600})
	}
	// gwx's grant breaks the assertion: the dry run says so, apply refuses.
	dry, err := apply(file, true)
	if err != nil || len(dry.GetBroken()) != 1 || !strings.Contains(dry.GetBroken()[0], "gwx") {
		t.Fatalf("dry run: %v, broken %q", err, dry.GetBroken())
	}
	if _, err := apply(file, false); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("a file whose awaiting gateway breaks an assertion: %v", err)
	}
	file = strings.Replace(file, "readers: [gw-audit]", "readers: [gwx]", 1)
	r, err := apply(file, false)
	if err != nil || len(r.GetTokens()) != 2 {
		t.Fatalf("apply: %v, tokens %v", err, r.GetTokens())
	}
	tokens := map[string]*api.ApplyOrgToken{}
	for _, tok := range r.GetTokens() {
		tokens[tok.GetDevice()] = tok
	}
	if tokens["web5"].GetOverlay() != "100.64.3.5/16" || !strings.HasPrefix(tokens["gwx"].GetToken(), tokenPrefix) {
		t.Fatalf("tokens: %v", r.GetTokens())
	}
	if audit := readFile(t, l.audit); strings.Contains(audit, tokens["gwx"].GetToken()) {
		t.Fatal("a join token's secret is in the audit log")
	}
	again := func(when string) {
		t.Helper()
		if r, err := apply(file, false); err != nil || len(r.GetPlan()) != 0 || len(r.GetTokens()) != 0 {
			t.Fatalf("the same file again, %s: %v, plan %q, tokens %v", when, err, r.GetPlan(), r.GetTokens())
		}
	}
	again("before the hosts join")

	// A new token for an awaiting device (enclave admin token create)
	// keeps it and its grant; the old token is gone.
	old := tokens["gwx"].GetToken()
	_, oldCSR := csrFor(t)
	tok, err := admin.CreateJoinToken(ctx, &api.CreateJoinTokenRequest{Name: "gwx", Role: "gateway", Enclave: 3})
	if err != nil {
		t.Fatal(err)
	}
	if g, err := admin.Status(ctx, &api.StatusRequest{}); err != nil || len(g.GetGrants()) != 1 {
		t.Fatalf("the awaiting gateway's grant after a new token: %v %v", err, g.GetGrants())
	}
	if _, err := api.NewEnrollClient(l.anonymous()).Join(ctx, &api.JoinRequest{Token: old, Csr: oldCSR}); status.Code(err) != codes.NotFound {
		t.Fatalf("the replaced token: %v", err)
	}
	gw := l.joinWith(tok.GetToken())
	web := l.joinWith(tokens["web5"].GetToken())
	for name, cr := range map[string]*Credentials{"gwx": gw, "web5": web} {
		if _, err := api.NewEnrollClient(l.connWith(cr)).ConfirmJoin(ctx, &api.ConfirmJoinRequest{}); err != nil {
			t.Fatalf("%s confirms: %v", name, err)
		}
	}
	st, err := admin.Status(ctx, &api.StatusRequest{})
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range st.GetDevices() {
		if d.GetPending() {
			t.Errorf("%s still pending after its join", d.GetName())
		}
	}
	again("after the hosts joined")
	// The gateway reads 3-7 as its grant says.
	keys, err := api.NewKeyServiceClient(l.connWith(gw)).GetPairKeys(ctx, &api.GetPairKeysRequest{Pairs: []*api.Pair{{A: 3, B: 7}}})
	if err != nil || len(keys.GetKeys()) == 0 {
		t.Fatalf("the joined gateway's pair keys: %v %v", err, keys)
	}
	// The audit log tells when the file's assertion was kept, and that
	// nothing broke it since.
	f, err := os.Open(l.audit)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	r2 := visibility.NewReplay()
	if _, err := audit.Walk(f, r2.Add); err != nil {
		t.Fatal(err)
	}
	h := r2.History(keyspkg.Layout{}, registry.Assertion{Kind: registry.AssertOnly, Pair: registry.NewPair(3, 7), Readers: []string{"gwx"}})
	if len(h.Kept) != 1 || !h.Kept[0].Until.IsZero() || slices.ContainsFunc(h.Broken, func(b visibility.Breach) bool { return b.WhileKept }) {
		t.Fatalf("the assertion's history: %+v", h)
	}
}
