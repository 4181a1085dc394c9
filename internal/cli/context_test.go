package cli

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
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
