package cli

import (
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
			name, _, _ := strings.Cut(ty.Field(i).Tag.Get("yaml"), ",")
			if c.cmd.Flags().Lookup(name) == nil {
				t.Errorf("%s: the YAML key %q of %s is no flag", c.cmd.Name(), name, ty.Field(i).Name)
			}
		}
	}
}
