package cli

import (
	"encoding/json"
	"github.com/spf13/cobra"
	"runtime"
	"strings"
	"testing"
)

// TestVersion: enclave version and --version print the same line, with
// the Go release; --json carries the same fields.
func TestVersion(t *testing.T) {
	code, out, _ := runCLI("version")
	if code != 0 || !strings.HasPrefix(out, "enclave ") || !strings.Contains(out, runtime.Version()) {
		t.Fatalf("version: %d %q", code, out)
	}
	code, flag, _ := runCLI("--version")
	if code != 0 || flag != out {
		t.Fatalf("--version: %d %q, version said %q", code, flag, out)
	}
	code, js, _ := runCLI("version", "--json")
	var b buildInfo
	if err := json.Unmarshal([]byte(js), &b); code != 0 || err != nil || b.Go != runtime.Version() || b.Version == "" {
		t.Fatalf("version --json: %d %q %v", code, js, err)
	}
}

// TestBuildInfoString: each way a build can be stamped reads clearly.
func TestBuildInfoString(t *testing.T) {
	for _, c := range []struct {
		b    buildInfo
		want string
	}{
		{buildInfo{Version: "v1.2.3", Go: "go1.26.0"}, "enclave v1.2.3 (no VCS revision: built outside a checkout or with -buildvcs=false) go1.26.0"},
		{buildInfo{Version: "v1.2.3", Revision: "abc", Time: "2026-12-02T08:00:00Z", Go: "go1.26.0"}, "enclave v1.2.3 (revision abc, 2026-12-02T08:00:00Z) go1.26.0"},
		{buildInfo{Version: "(devel)", Revision: "abc", Modified: true, Go: "go1.26.0"}, "enclave (devel) (revision abc, with uncommitted changes) go1.26.0"},
	} {
		if got := c.b.String(); got != c.want {
			t.Errorf("%+v: %q, want %q", c.b, got, c.want)
		}
	}
}

// TestEveryCommandHasExamples: every command that runs (not one that only
// groups others) has a short line and examples in its --help.
func TestEveryCommandHasExamples(t *testing.T) {
	var walk func(c *cobra.Command)
	walk = func(c *cobra.Command) {
		if c.Runnable() && !c.HasSubCommands() && c != c.Root() {
			if c.Short == "" || (c.Example == "" && !strings.Contains(c.Long, "Example")) {
				t.Errorf("%s: no short line or no examples in its help", c.CommandPath())
			}
		}
		for _, s := range c.Commands() {
			walk(s)
		}
	}
	walk(newRoot(IO{}))
	for path := range examples {
		if c, _, err := newRoot(IO{}).Find(strings.Fields(path)[1:]); err != nil || c.CommandPath() != path {
			t.Errorf("examples for %q, which is no command", path)
		}
	}
}
