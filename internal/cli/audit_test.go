package cli

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/enclavekeys/enclave/internal/audit"
)

func TestAuditVerify(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	l, err := audit.Open(path, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ {
		if err := l.Append(audit.Entry{Caller: "spiffe://o/admin/a", Role: "admin", RPC: "AddEnclave", Decision: audit.Allow}); err != nil {
			t.Fatal(err)
		}
	}
	l.Close()
	code, stdout, _ := runCLI("audit", "verify", path)
	if code != 0 || !strings.HasPrefix(stdout, "OK: 3 entries") {
		t.Fatalf("verify: %d %q", code, stdout)
	}
	b, _ := os.ReadFile(path)
	os.WriteFile(path, []byte(strings.Replace(string(b), `"seq":2,"time":"`, `"seq":2,"time":"1`, 1)), 0o600)
	code, _, stderr := runCLI("audit", "verify", path)
	if code != 1 || !strings.Contains(stderr, "line 2") {
		t.Fatalf("edited log: %d %q", code, stderr)
	}
	if code, _, _ := runCLI("audit", "verify", filepath.Join(t.TempDir(), "none")); code != 2 {
		t.Fatalf("missing file: %d", code)
	}
	if code, _, _ := runCLI("audit", "verify"); code != 2 {
		t.Fatalf("no file: %d", code)
	}
}
