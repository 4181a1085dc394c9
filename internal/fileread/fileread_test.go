package fileread

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
)

func TestBounded(t *testing.T) {
	dir := t.TempDir()
	small := filepath.Join(dir, "small")
	os.WriteFile(small, []byte("0123456789"), 0o600)
	if b, err := Bounded(small, 10); err != nil || string(b) != "0123456789" {
		t.Fatalf("at the bound: %q %v", b, err)
	}
	if _, err := Bounded(small, 9); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("over the bound: %v", err)
	}
	if _, err := Bounded(filepath.Join(dir, "none"), 10); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("missing: %v", err)
	}
	// An endless device is refused after max+1 bytes, not read to the end.
	if _, err := Bounded("/dev/zero", MaxConfig); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("/dev/zero: %v", err)
	}
}
