package visibility

import (
	"fmt"
	"slices"

	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/registry"
)

// Breaks lists how the readers of pairs (every allowed pair with its
// readers, as a map's Pairs) break the sight assertion a, one line a
// reader; verb is how a line says the reader's sight ("would read" for a
// change, "could read" for the past). The key service holds changes to it
// (keyserver/assertions.go) and the audit replays the log against it
// (Replay.History), so both judge an assertion alike.
func Breaks(l keys.Layout, pairs []Pair, a registry.Assertion, verb string) []string {
	var out []string
	switch a.Kind {
	case registry.AssertNever, registry.AssertOnly:
		for _, p := range pairs {
			if !p.Allowed || !registry.Covers(l, a.Pair, registry.NewPair(keys.EnclaveID(p.A), keys.EnclaveID(p.B))) {
				continue
			}
			for _, r := range p.Readers {
				switch {
				case a.Kind == registry.AssertNever && Names(a.Reader, r):
				case a.Kind == registry.AssertOnly && !ownRight(r.Right) && !slices.ContainsFunc(a.Readers, func(x string) bool { return Names(x, r) }):
				default:
					continue
				}
				out = append(out, fmt.Sprintf("%s (%s) %s pair %s by %s", r.Device, r.Role, verb, p.Key(), r.Right))
			}
		}
	case registry.AssertAlways:
		for _, p := range pairs {
			if registry.NewPair(keys.EnclaveID(p.A), keys.EnclaveID(p.B)) != a.Pair || !p.Allowed {
				continue
			}
			if slices.ContainsFunc(p.Readers, func(r Reader) bool { return Names(a.Reader, r) && r.Unsure == "" }) {
				return nil
			}
		}
		out = append(out, fmt.Sprintf("%s held no key of pair %s", a.Reader, registry.PairName(l, a.Pair)))
	}
	return out
}

// Always readers count only when they surely read (Reader.Unsure empty);
// never and only count every reader that may.

// Names reports whether reader (a device name, or role:ROLE) is r.
func Names(reader string, r Reader) bool {
	if role, ok := registry.RoleOf(reader); ok {
		return r.Role == string(role)
	}
	return r.Device == reader
}

// ownRight reports whether a right is one an only assertion leaves out:
// the pair's own servers (their server keys) and the key servers.
func ownRight(right string) bool {
	return right == RightServerKey || right == RightOrgKey || right == RightEnclaveTier
}
