package e2e

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestAssertCommands: enclave admin assert against a real key server: an
// assertion kept, a grant that would break it refused (also as a dry
// run) with the assertion and the reader named, check listing it as
// holding, and the grant taken once the assertion is removed.
func TestAssertCommands(t *testing.T) {
	e := newEnv(t)
	ks := e.pairOrg()
	e.issue("gw", "gateway", "--enclave", "7")
	e.ok(e.admin(ks, "assert", "add", "--never", "--reader", "role:gateway", "--pair", "3-7")...)
	e.ok(e.admin(ks, "device", "add", "--name", "gw", "--role", "gateway", "--enclave", "7")...)
	for _, extra := range [][]string{{"--dry-run"}, nil} {
		code, _, stderr := e.run(e.admin(ks, append([]string{"grant", "add", "--device", "gw", "--pairs", "3-7"}, extra...)...)...)
		if code != 1 || !strings.Contains(stderr, "never: {reader: role:gateway, pair: 3-7}") || !strings.Contains(stderr, "gw (gateway) would read pair 3-7") {
			t.Fatalf("grant add %v against the assertion: exit %d\n%s", extra, code, stderr)
		}
	}
	if out := e.ok(e.admin(ks, "assert", "check")...); !strings.Contains(out, "never: {reader: role:gateway, pair: 3-7}") || !strings.Contains(out, "every assertion holds") {
		t.Fatalf("assert check:\n%s", out)
	}
	if code, _, stderr := e.run(e.admin(ks, "assert", "add", "--only", "--reader", "gw", "--pair", "3-7")...); code != 2 || !strings.Contains(stderr, "--readers") {
		t.Fatalf("--only with --reader: exit %d\n%s", code, stderr)
	}
	// The organisation file names the assertion; the same registry gives
	// the same bytes.
	export := e.ok(e.admin(ks, "export")...)
	for _, want := range []string{"- never:\n      reader: role:gateway\n      pair: 3-7", "- name: web1\n    role: server\n    enclave: \"3\"\n    server_id: 258", "allow:\n    - 3-7"} {
		if !strings.Contains(export, want) {
			t.Fatalf("export lacks %q:\n%s", want, export)
		}
	}
	if again := e.ok(e.admin(ks, "export")...); again != export {
		t.Fatalf("two exports of one registry differ:\n%s\n---\n%s", export, again)
	}
	// Export, apply: nothing to change, and the registry exports the same.
	e.ok(e.admin(ks, "export", "--out", "org.yaml")...)
	if out := e.ok(e.admin(ks, "apply", "org.yaml", "--dry-run")...); !strings.Contains(out, "dry run, nothing changed") || !strings.Contains(out, "nothing to change") {
		t.Fatalf("apply --dry-run of the export:\n%s", out)
	}
	if out := e.ok(e.admin(ks, "apply", "org.yaml")...); !strings.Contains(out, "nothing to change") {
		t.Fatalf("apply of the export:\n%s", out)
	}
	if again := e.ok(e.admin(ks, "export")...); again != export {
		t.Fatalf("export, apply, export differ:\n%s\n---\n%s", export, again)
	}
	// A file adding a gateway and its grant: the dry run names the
	// assertion it would break, and exits 1.
	withGW := strings.Replace(export, "devices:\n", "devices:\n  - name: gw-new\n    role: gateway\n    enclave: \"7\"\n", 1)
	withGW = strings.Replace(withGW, "grants: []\n", "grants:\n  - device: gw-new\n    pairs: [3-7]\n", 1)
	os.WriteFile(filepath.Join(e.dir, "gw.yaml"), []byte(withGW), 0o600)
	if code, out, stderr := e.run(e.admin(ks, "apply", "gw.yaml", "--dry-run")...); code != 1 || !strings.Contains(out, "+ device gw-new (gateway): a join token for its host") ||
		!strings.Contains(stderr, "never: {reader: role:gateway, pair: 3-7}: gw-new (gateway) would read pair 3-7") {
		t.Fatalf("apply --dry-run of a file breaking an assertion: exit %d\n%s%s", code, out, stderr)
	}
	e.ok(e.admin(ks, "assert", "remove", "--never", "--reader", "role:gateway", "--pair", "3-7")...)
	// Without it, the file applies: gw-new's join token is printed once.
	withGW = strings.Replace(withGW, "assertions:\n  - never:\n      reader: role:gateway\n      pair: 3-7\n", "assertions: []\n", 1)
	os.WriteFile(filepath.Join(e.dir, "gw.yaml"), []byte(withGW), 0o600)
	if out := e.ok(e.admin(ks, "apply", "gw.yaml", "--token-ttl", "10m", "--tokens-out", "tokens")...); !strings.Contains(out, "  gw-new: tokens/gw-new.token (until ") ||
		strings.Contains(out, "enclave-join-") || !strings.Contains(out, "enclave join --keyserver "+ks.addr+" --token-file NAME.token --ca-fingerprint sha256:") {
		t.Fatalf("apply of a file adding a gateway:\n%s", out)
	}
	tokenFile := filepath.Join(e.dir, "tokens", "gw-new.token")
	if b, err := os.ReadFile(tokenFile); err != nil || !strings.HasPrefix(string(b), "enclave-join-") || strings.Count(string(b), "\n") != 1 {
		t.Fatalf("the token's file: %v %q", err, b)
	}
	if fi, err := os.Stat(tokenFile); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("the token file's mode: %v %v", err, fi.Mode())
	}
	// Applied again: nothing to add, and the tokens' directory is no
	// obstacle (a CI job run twice).
	if out := e.ok(e.admin(ks, "apply", "gw.yaml", "--tokens-out", "tokens")...); !strings.Contains(out, "nothing to change") {
		t.Fatalf("the same file again:\n%s", out)
	}
	e.ok(e.admin(ks, "grant", "add", "--device", "gw", "--pairs", "3-7")...)
	if code, _, stderr := e.run(e.admin(ks, "assert", "add", "--never", "--reader", "gw", "--pair", "3-7")...); code != 1 || !strings.Contains(stderr, "gw (gateway) reads pair 3-7") {
		t.Fatalf("an assertion broken now: exit %d\n%s", code, stderr)
	}
}
