package registry

import (
	"fmt"
	"slices"
	"strings"

	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/echo"
	"github.com/enclavekeys/enclave/internal/keys"
)

// Sight assertions (issue 34): guarantees about who can read a pair, kept
// in the registry and checked by the key service on every change that
// could break one (keyserver/assertions.go), however it is made:
//
//	never:  Reader reads Pair, at any level, by any right
//	only:   besides Pair's own servers and the key servers, Pair's readers
//	        (at any level beneath it) are exactly Readers
//	always: Reader keeps reading Pair
//
// A reader is a device name or a role (role:gateway, role:monitor, ...).

// The kinds of assertion.
const (
	AssertNever  = "never"
	AssertOnly   = "only"
	AssertAlways = "always"
)

// MaxOnlyReaders bounds an only assertion's readers, so that one is
// written whole in one audit entry.
const MaxOnlyReaders = 12

// Assertion is one sight assertion.
type Assertion struct {
	Kind    string   `json:"kind"`
	Reader  string   `json:"reader,omitempty"`
	Pair    Pair     `json:"pair"`
	Readers []string `json:"readers,omitempty"`
}

// Describe writes a as the org file and the tools write it, ids under
// layout of s.
func (s *State) Describe(a Assertion) string { return DescribeIn(s.Layout(), a) }

// DescribeIn writes a as the org file and the tools write it, ids under
// layout l.
func DescribeIn(l keys.Layout, a Assertion) string {
	switch a.Kind {
	case AssertOnly:
		return fmt.Sprintf("only: {pair: %s, readers: [%s]}", PairName(l, a.Pair), strings.Join(a.Readers, ", "))
	default:
		return fmt.Sprintf("%s: {reader: %s, pair: %s}", a.Kind, a.Reader, PairName(l, a.Pair))
	}
}

// RoleOf is the role a reader names (role:gateway), if it names one.
func RoleOf(reader string) (ca.Role, bool) {
	r, ok := strings.CutPrefix(reader, "role:")
	if !ok {
		return "", false
	}
	role, err := ca.ParseRole(r)
	return role, err == nil
}

// checkReader refuses a reader that names neither a role nor a valid
// device name (a device not registered yet may be named: an assertion
// may come before the device).
func checkReader(reader string) error {
	if strings.HasPrefix(reader, "role:") {
		if _, ok := RoleOf(reader); !ok {
			return fmt.Errorf("%w: reader %q: role:ROLE names server, client, gateway, keyserver, monitor or admin", ErrInvalid, echo.Cut(reader))
		}
		return nil
	}
	if !nameRE.MatchString(reader) {
		return fmt.Errorf("%w: reader %q is no device name nor role:ROLE", ErrInvalid, echo.Cut(reader))
	}
	return nil
}

// AddAssertion keeps a new assertion; its pair names registered
// (sub-)enclaves. Whether it holds now is the key service's to check.
func (s *State) AddAssertion(a Assertion) error {
	switch a.Kind {
	case AssertNever, AssertAlways:
		if a.Reader == "" || len(a.Readers) > 0 {
			return fmt.Errorf("%w: a %s assertion names one reader and a pair", ErrInvalid, a.Kind)
		}
		if err := checkReader(a.Reader); err != nil {
			return err
		}
	case AssertOnly:
		if a.Reader != "" {
			return fmt.Errorf("%w: an only assertion names a pair and its readers (readers: [...]), not one reader", ErrInvalid)
		}
		if len(a.Readers) > MaxOnlyReaders {
			return fmt.Errorf("%w: an only assertion names at most %d readers (name a role, role:gateway, for more)", ErrInvalid, MaxOnlyReaders)
		}
		for _, r := range a.Readers {
			if err := checkReader(r); err != nil {
				return err
			}
		}
	default:
		return fmt.Errorf("%w: an assertion is never, only or always, not %q", ErrInvalid, echo.Cut(a.Kind))
	}
	a = a.Normal()
	for _, id := range []keys.EnclaveID{a.Pair.A, a.Pair.B} {
		if _, ok := s.Enclave(id); !ok {
			return fmt.Errorf("%w: enclave %s of the assertion's pair", ErrNotFound, s.ID(id))
		}
	}
	if slices.ContainsFunc(s.Assertions, a.Equal) {
		return fmt.Errorf("%w: assertion %s", ErrExists, s.Describe(a))
	}
	s.Assertions = append(s.Assertions, a)
	return nil
}

// RemoveAssertion drops an assertion (the same kind, reader(s) and pair).
func (s *State) RemoveAssertion(a Assertion) error {
	a = a.Normal()
	n := len(s.Assertions)
	s.Assertions = slices.DeleteFunc(s.Assertions, a.Equal)
	if len(s.Assertions) == n {
		return fmt.Errorf("%w: no assertion %s", ErrNotFound, s.Describe(a))
	}
	return nil
}

// Normal is a with its pair ordered and its readers sorted, once each:
// the form the registry keeps, and compares.
func (a Assertion) Normal() Assertion {
	a.Pair = NewPair(a.Pair.A, a.Pair.B)
	a.Readers = slices.Compact(slices.Sorted(slices.Values(a.Readers)))
	return a
}

// Equal reports whether a and b are the same assertion (both Normal).
func (a Assertion) Equal(b Assertion) bool {
	return a.Kind == b.Kind && a.Reader == b.Reader && a.Pair == b.Pair && slices.Equal(a.Readers, b.Readers)
}
