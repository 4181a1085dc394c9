package cli

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/enclavekeys/enclave/internal/keys"
)

// enclaveFlag is an enclave id flag: an integer from 1 to 65535, or an id
// dotted by the org's layout (3.2, DESIGN §3a), checked when it is parsed,
// so that every command takes ids the same way and says the same thing
// about a bad one. The zero value is "not given". A dotted id means
// nothing without the layout: in reads it under one.
type enclaveFlag struct {
	raw string
	id  keys.EnclaveID // the id in the default layout; 0 for a dotted one
	// layout, where the command has a --layout flag, reads dotted ids
	// without a key service to ask (cert issue).
	layout *layoutFlag
}

// local is the id under the command's --layout (the default without one).
func (f *enclaveFlag) local() (keys.EnclaveID, error) {
	var l keys.Layout
	if f.layout != nil {
		l = f.layout.l
	}
	if f.raw != "" && f.id == 0 && l.IsDefault() {
		return 0, fmt.Errorf("%w: %q is dotted: give the org's layout with --layout (as 8.8)", keys.ErrDotted, f.raw)
	}
	return f.in(l)
}

func (f *enclaveFlag) String() string { return f.raw }

func (f *enclaveFlag) Set(s string) error {
	if !strings.Contains(s, ".") {
		id, err := keys.ParseEnclaveID(s)
		if err != nil {
			return err
		}
		f.raw, f.id = s, id
		return nil
	}
	for _, part := range strings.Split(s, ".") {
		if _, err := strconv.ParseUint(part, 10, 16); err != nil {
			return fmt.Errorf("%w: %q: each part of a dotted id is a number", keys.ErrDotted, s)
		}
	}
	f.raw, f.id = s, 0
	return nil
}

func (f *enclaveFlag) Type() string { return "I" }

// given reports whether the flag was given.
func (f *enclaveFlag) given() bool { return f.raw != "" }

// in is the id under layout l (0 when not given).
func (f *enclaveFlag) in(l keys.Layout) (keys.EnclaveID, error) {
	if f.raw == "" {
		return 0, nil
	}
	return l.ParseID(f.raw)
}

// layoutFlag is the org's enclave layout (8.8), for tools that read
// dotted ids without a key service to ask.
type layoutFlag struct{ l keys.Layout }

func (f *layoutFlag) String() string {
	if f.l.IsDefault() {
		return ""
	}
	return f.l.String()
}

func (f *layoutFlag) Set(s string) error {
	l, err := keys.ParseLayout(s)
	if err != nil {
		return err
	}
	f.l = l
	return nil
}

func (f *layoutFlag) Type() string { return "W1.W2..." }

// serverIDFlag is a server id flag: an integer from 0 to 4294967295.
type serverIDFlag struct {
	id  keys.ServerID
	set bool
}

func (f *serverIDFlag) String() string {
	if !f.set {
		return ""
	}
	return strconv.FormatUint(uint64(f.id), 10)
}

func (f *serverIDFlag) Set(s string) error {
	id, err := keys.ParseServerID(s)
	if err != nil {
		return err
	}
	f.id, f.set = id, true
	return nil
}

func (f *serverIDFlag) Type() string { return "K" }
