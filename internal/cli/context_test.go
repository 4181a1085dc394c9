package cli

import (
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/enclavekeys/enclave/internal/ca"
)

// TestAdminContext (issue 32): the connection settings come from the
// flags, else the environment, else the context file (its relative paths
// from its directory); a missing default file is no error, a missing
// named one is; what is still missing is named with where it may come
// from.
func TestAdminContext(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "admin.yaml")
	os.WriteFile(file, []byte("keyserver: 192.0.2.10:7443\nca: ca/ca.crt\ncert: certs/alice.crt\nkey: /abs/alice.key\n"), 0o600)
	t.Setenv("ENCLAVE_CONTEXT", file)
	t.Setenv("ENCLAVE_CERT", "env.crt")
	c := connFlags{key: "flag.key"}
	if err := c.fromContext(); err != nil {
		t.Fatal(err)
	}
	want := connFlags{keyserver: "192.0.2.10:7443", ca: filepath.Join(dir, "ca/ca.crt"), cert: "env.crt", key: "flag.key"}
	if c != want {
		t.Fatalf("got %+v, want %+v", c, want)
	}
	os.WriteFile(file, []byte("keyserver: x\nbogus: 1\n"), 0o600)
	if err := (&connFlags{}).fromContext(); err == nil || !strings.Contains(err.Error(), "bogus") {
		t.Fatalf("a context file with an unknown setting: %v", err)
	}
	t.Setenv("ENCLAVE_CONTEXT", filepath.Join(dir, "none.yaml"))
	if err := (&connFlags{}).fromContext(); err == nil {
		t.Fatal("a named context file that is missing: no error")
	}
	t.Setenv("ENCLAVE_CONTEXT", "")
	t.Setenv("XDG_CONFIG_HOME", filepath.Join(dir, "empty"))
	t.Setenv("ENCLAVE_CERT", "")
	var empty connFlags
	if err := empty.fromContext(); err != nil {
		t.Fatalf("no context file at the default place: %v", err)
	}
	if _, _, err := empty.dial(); err == nil || !strings.Contains(err.Error(), "ENCLAVE_") {
		t.Fatalf("nothing given: %v", err)
	}
}

// TestJoinKeyFileChecked (issue 32, attacker review): join takes the key
// of an earlier try only from a file of its own user, mode 0600, not a
// link, in a directory others may not write in: another user's planted
// key would become the device's.
func TestJoinKeyFileChecked(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, ".join-x.key")
	k1, _, err := joinKey(path) // made and kept
	if err != nil {
		t.Fatal(err)
	}
	if k2, _, err := joinKey(path); err != nil || !k2.Equal(k1) {
		t.Fatalf("the kept key again: %v", err)
	}
	os.Chmod(path, 0o644)
	if _, _, err := joinKey(path); err == nil {
		t.Fatal("a key file others may read was taken")
	}
	os.Remove(path)
	other := filepath.Join(dir, "planted.key")
	os.WriteFile(other, []byte("x"), 0o600)
	os.Symlink(other, path)
	if _, _, err := joinKey(path); err == nil {
		t.Fatal("a link was followed")
	}
	if os.Geteuid() == 0 { // a directory another user owns (attacker review)
		theirs := filepath.Join(t.TempDir(), "theirs")
		os.Mkdir(theirs, 0o755)
		os.Chown(theirs, 65534, 65534)
		if _, _, err := joinKey(filepath.Join(theirs, ".join-z.key")); err == nil {
			t.Fatal("a directory another user owns was taken")
		}
	}
	open := filepath.Join(t.TempDir(), "shared")
	os.Mkdir(open, 0o777)
	os.Chmod(open, 0o777)
	if _, _, err := joinKey(filepath.Join(open, ".join-y.key")); err == nil || !strings.Contains(err.Error(), "only its owner may write") {
		t.Fatalf("a directory others may write in: %v", err)
	}
}

// TestRenewedPairWhenCertStale (issue 32, operator review): a device
// whose --cert no longer verifies (expired, or of a CA rolled away) starts
// from the renewed pair in --renew-dir when that one verifies, instead of
// failing to start; with no renewed pair it stays with --cert (and says
// why at load).
func TestRenewedPairWhenCertStale(t *testing.T) {
	dir := t.TempDir()
	old, err := ca.Init(filepath.Join(dir, "old"), "example.org", time.Now())
	if err != nil {
		t.Fatal(err)
	}
	cur, err := ca.Init(filepath.Join(dir, "cur"), "example.org", time.Now())
	if err != nil {
		t.Fatal(err)
	}
	id := ca.Identity{Name: "web2", Role: ca.RoleServer, Enclave: 3, ServerID: 2, HasServerID: true, Overlay: netip.MustParsePrefix("100.64.3.2/16")}
	given, _ := old.Issue(id, nil, 30, time.Now())
	if err := given.WriteFiles(filepath.Join(dir, "etc"), "web2"); err != nil {
		t.Fatal(err)
	}
	renewDir := filepath.Join(dir, "state")
	caPath, certPath, keyPath := filepath.Join(dir, "cur", "ca.crt"), filepath.Join(dir, "etc", "web2.crt"), filepath.Join(dir, "etc", "web2.key")
	if f := newDeviceFiles(caPath, certPath, keyPath, renewDir); f.renewedAtStart || f.cert != certPath {
		t.Fatalf("no renewed pair: %+v", f)
	}
	renewed, _ := cur.Issue(id, nil, 30, time.Now())
	if err := renewed.WriteFiles(renewDir, "web2"); err != nil {
		t.Fatal(err)
	}
	f := newDeviceFiles(caPath, certPath, keyPath, renewDir)
	if !f.renewedAtStart || f.cert != filepath.Join(renewDir, "web2.crt") {
		t.Fatalf("a stale --cert and a good renewed pair: %+v", f)
	}
	// --cert renewed by hand afterwards (operator review: SIGHUP kept the
	// older renewed pair): the next choice takes it.
	later, _ := cur.Issue(id, nil, 30, time.Now().Add(10*time.Second))
	if err := ca.ReplacePair(certPath, keyPath, later.CertPEM, later.KeyPEM); err != nil {
		t.Fatal(err)
	}
	if f.choose() || f.cert != certPath {
		t.Fatalf("after --cert was renewed by hand: %+v", f)
	}
	// A renewed pair whose key is not its certificate's (a crash between
	// a renewal's two renames): --cert is kept (attacker review).
	os.RemoveAll(renewDir)
	mixed, _ := cur.Issue(id, nil, 30, time.Now().Add(20*time.Second))
	stray, _ := cur.Issue(id, nil, 30, time.Now().Add(20*time.Second))
	os.MkdirAll(renewDir, 0o700)
	os.WriteFile(filepath.Join(renewDir, "web2.crt"), mixed.CertPEM, 0o644)
	os.WriteFile(filepath.Join(renewDir, "web2.key"), stray.KeyPEM, 0o600)
	if f.choose() || f.cert != certPath {
		t.Fatalf("a renewed certificate with another key was taken: %+v", f)
	}
	other, _ := cur.Issue(ca.Identity{Name: "web2", Role: ca.RoleClient, Enclave: 3}, nil, 30, time.Now())
	os.RemoveAll(renewDir)
	other.WriteFiles(renewDir, "web2")
	if f := newDeviceFiles(caPath, filepath.Join(dir, "etc", "web2.crt.old"), filepath.Join(dir, "etc", "web2.key.old"), renewDir); f.renewedAtStart {
		t.Fatal("a renewed pair of another role was taken")
	}
}
