package cli

import (
	"fmt"
	"os"
	"testing"
)

// TestMain keeps the tests from the user's admin context: no ENCLAVE_*
// settings, and a configuration directory of their own, so that a
// ~/.config/enclave/admin.yaml on the machine changes nothing.
func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "enclave-cli-test")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	for _, k := range []string{"ENCLAVE_CONTEXT", "ENCLAVE_KEYSERVER", "ENCLAVE_SERVER_NAME", "ENCLAVE_CA", "ENCLAVE_CERT", "ENCLAVE_KEY"} {
		os.Unsetenv(k)
	}
	os.Setenv("XDG_CONFIG_HOME", dir)
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}
