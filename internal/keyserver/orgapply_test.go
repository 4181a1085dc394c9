package keyserver

import (
	"bytes"
	"context"
	"slices"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/enclavekeys/enclave/internal/api"
	"github.com/enclavekeys/enclave/internal/orgfile"
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
		return admin.ApplyOrg(ctx, &api.ApplyOrgRequest{File: raw, DryRun: dry})
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
	changed = strings.Replace(changed, "  - name: laptop\n    role: client\n    enclave: \"7\"\n", "", 1) // laptop leaves: revoked
	if changed == string(first) || strings.Contains(changed, "laptop") {
		t.Fatalf("the test's edits did not take:\n%s", changed)
	}
	dry, err := apply([]byte(changed), true)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"+ enclave 12 (new)", "+ device srv12 (server)", "- device laptop: revoked (not in the file)", "+ pair allow 3-12"} {
		if !slices.Contains(dry.GetPlan(), want) {
			t.Errorf("the plan lacks %q: %q", want, dry.GetPlan())
		}
	}
	if !bytes.Equal(export(), first) {
		t.Fatal("a dry run changed the registry")
	}
	if _, err := apply([]byte(changed), false); err != nil {
		t.Fatal(err)
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
}
