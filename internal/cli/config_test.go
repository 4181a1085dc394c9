package cli

import (
	"os"
	"reflect"
	"strings"
	"testing"

	"github.com/spf13/cobra"
)

// TestConfigKeysAreFlags: every YAML key of a command's settings is one of
// its flags, as mergeConfigFile (which lets a given flag win) relies on.
func TestConfigKeysAreFlags(t *testing.T) {
	for _, c := range []struct {
		cmd *cobra.Command
		cfg any
	}{
		{newAgentCmd(IO{}), agentConfig{}},
		{newGatewayCmd(IO{}), gatewayConfig{}},
		{newKeyserverCmd(IO{}), keyserverConfig{}},
	} {
		ty := reflect.TypeOf(c.cfg)
		for i := range ty.NumField() {
			if !ty.Field(i).IsExported() {
				continue // not a setting: YAML leaves it alone
			}
			name, _, _ := strings.Cut(ty.Field(i).Tag.Get("yaml"), ",")
			if c.cmd.Flags().Lookup(name) == nil {
				t.Errorf("%s: the YAML key %q of %s is no flag", c.cmd.Name(), name, ty.Field(i).Name)
			}
		}
	}
}

// TestConfigTypoSaysSetting: a misspelt or mistyped setting is named in
// the settings' words, never by the Go type holding them.
func TestConfigTypoSaysSetting(t *testing.T) {
	path := t.TempDir() + "/agent.yaml"
	if err := os.WriteFile(path, []byte("lisen: 1.2.3.4\nmtu: abc\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	code, _, stderr := runCLI("agent", "--config", path)
	if code != 2 || !strings.Contains(stderr, `line 1: unknown setting "lisen"`) || !strings.Contains(stderr, "listen") ||
		!strings.Contains(stderr, "line 2:") || strings.Contains(stderr, "agentConfig") || strings.Contains(stderr, " into ") {
		t.Fatalf("exit %d: %s", code, stderr)
	}
}
