// Package fileread reads the small files a user names (keys, certificates,
// configuration) with a bound on their size, so that a wrong path such as
// /dev/zero or a huge file is refused at once instead of filling memory.
package fileread

import (
	"errors"
	"fmt"
	"io"
	"os"
)

// Bounds for the kinds of file Enclave reads whole.
const (
	// MaxKey bounds a key file: 64 hex digits and some white space.
	MaxKey = 4 << 10
	// MaxPEM bounds a certificate or private key file.
	MaxPEM = 64 << 10
	// MaxConfig bounds a configuration file.
	MaxConfig = 1 << 20
)

// ErrTooLarge: the file holds more than the bound allows.
var ErrTooLarge = errors.New("file too large")

// Bounded returns the contents of path if they are at most max bytes. It
// reads at most max+1 bytes whatever the file is (a device, a pipe, a
// growing file).
func Bounded(path string, max int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, max+1))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if int64(len(b)) > max {
		clear(b)
		return nil, fmt.Errorf("%s: %w (more than %d bytes)", path, ErrTooLarge, max)
	}
	return b, nil
}
