//go:build !linux

package gsosize

import "log/slog"

// Config sets up a Marker.
type Config struct {
	// Port is the data port whose runs are marked.
	Port uint16
	// Logger gets a line per interface the program could not join.
	Logger *slog.Logger
}

// Marker is Linux only.
type Marker struct{}

// Start fails: only Linux runs the program.
func Start(Config) (*Marker, error) { return nil, ErrUnsupported }

// Interfaces names none.
func (*Marker) Interfaces() []string { return nil }

// Failed names none.
func (*Marker) Failed() map[string]string { return nil }

// Close does nothing.
func (*Marker) Close() error { return nil }
