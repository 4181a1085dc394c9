// Package testvec loads the test vectors in the repository's testdata/
// folder for the tests of any package. It is used only by tests.
package testvec

import (
	"encoding/hex"
	"os"
	"path/filepath"
	"testing"
)

// Hex decodes s or fails the test.
func Hex(t testing.TB, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(s)
	if err != nil {
		t.Fatalf("bad hex %q: %v", s, err)
	}
	return b
}

// Read returns the contents of testdata/name, found by walking up from the
// test's working directory to the module root (the folder with go.mod).
func Read(t testing.TB, name string) []byte {
	t.Helper()
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			b, err := os.ReadFile(filepath.Join(dir, "testdata", name))
			if err != nil {
				t.Fatal(err)
			}
			return b
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			t.Fatalf("testdata/%s: no go.mod above the test's directory", name)
		}
		dir = parent
	}
}
