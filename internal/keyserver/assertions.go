package keyserver

import (
	"context"
	"fmt"
	"slices"
	"strings"

	"github.com/enclavekeys/enclave/internal/api"
	"github.com/enclavekeys/enclave/internal/audit"
	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/registry"
	"github.com/enclavekeys/enclave/internal/visibility"
)

// Sight assertions (issue 34; registry/assertions.go) are checked here, on
// the sight a registry gives (the visibility map of its status: every
// right by which a device holds a key that opens a pair's traffic). A
// change that would break one is refused, whichever command makes it.

// brokenAssertions says, for each way st breaks one of its assertions,
// which assertion and which reader; status is st's when the caller has it
// already (nil: made here).
func brokenAssertions(st *registry.State, status *api.StatusReply) []string {
	return brokenOf(st, st.Assertions, status)
}

// brokenOf is brokenAssertions of the assertions as, judged on status (a
// registry's, st's when nil); st gives the layout and names pairs.
func brokenOf(st *registry.State, as []registry.Assertion, status *api.StatusReply) []string {
	if len(as) == 0 {
		return nil
	}
	if status == nil {
		status = statusOf(st)
	}
	m := visibility.Build("", status, nil, visibility.Options{PairsOnly: true})
	var out []string
	for _, a := range as {
		for _, why := range breaks(st, m, a) {
			out = append(out, fmt.Sprintf("assertion %s: %s", st.Describe(a), why))
		}
	}
	return out
}

// breaks lists how m breaks a, for a change that would make m.
func breaks(st *registry.State, m *visibility.Map, a registry.Assertion) []string {
	if a.Kind == registry.AssertAlways {
		i := slices.IndexFunc(m.Pairs, func(p visibility.Pair) bool {
			return registry.NewPair(keysID(p.A), keysID(p.B)) == a.Pair
		})
		switch {
		case i < 0:
			return []string{fmt.Sprintf("pair %s names no registered enclaves", st.PairName(a.Pair))}
		case !m.Pairs[i].Allowed:
			return []string{fmt.Sprintf("pair %s would not be allowed to talk", m.Pairs[i].Key())}
		case !slices.ContainsFunc(m.Pairs[i].Readers, func(r visibility.Reader) bool { return visibility.Names(a.Reader, r) && r.Unsure == "" }):
			return []string{fmt.Sprintf("%s would hold no key of pair %s (surely: a reader whose host has not joined, or one in enclave-key mode, does not count)", a.Reader, m.Pairs[i].Key())}
		}
		return nil
	}
	return visibility.Breaks(st.Layout(), m.Pairs, a, "would read")
}

// holdAssertions refuses after if it breaks an assertion in a way the
// registry before it (broken: brokenAssertions of it) did not; one broken
// already, by a path that is not an admin change, does not lock every
// other change out.
func holdAssertions(broken []string, after *registry.State) error {
	if fresh := freshBreaks(broken, after); len(fresh) > 0 {
		return assertionError(fresh)
	}
	return nil
}

// freshBreaks are the assertions after breaks that were not broken
// already (broken: those broken before the change).
func freshBreaks(broken []string, after *registry.State) []string {
	var fresh []string
	for _, b := range brokenAssertions(after, nil) {
		if !slices.Contains(broken, b) {
			fresh = append(fresh, b)
		}
	}
	return fresh
}

// assertionError is the refusal of a change that would break assertions.
func assertionError(broken []string) error {
	more := ""
	if len(broken) > 3 {
		more = fmt.Sprintf(" (and %d more)", len(broken)-3)
		broken = broken[:3]
	}
	return fmt.Errorf("%w: refused, it would break %s%s%s", registry.ErrAssertion, strings.Join(broken, "; "), more, assertionAdvice)
}

// assertionAdvice ends a refusal for an assertion.
const assertionAdvice = " (change the assertion first, as an audited change of its own)"

func keysID(v uint32) keys.EnclaveID { return keys.EnclaveID(v) }

// assertionOf reads an API assertion.
func assertionOf(a *api.Assertion) (registry.Assertion, error) {
	ps, err := checkPairs([]*api.Pair{a.GetPair()})
	if err != nil {
		return registry.Assertion{}, fmt.Errorf("%w: %v", registry.ErrInvalid, err)
	}
	return registry.Assertion{Kind: a.GetKind(), Reader: a.GetReader(), Pair: ps[0], Readers: a.GetReaders()}, nil
}

func apiAssertion(a registry.Assertion) *api.Assertion {
	return &api.Assertion{Kind: a.Kind, Reader: a.Reader, Pair: apiPair(a.Pair), Readers: a.Readers}
}

// AddAssertion implements api.AdminServer.
func (s *Service) AddAssertion(ctx context.Context, req *api.AssertionRequest) (*api.AdminReply, error) {
	return s.apply(ctx, s.addAssertion(req))
}

func (s *Service) addAssertion(req *api.AssertionRequest) change {
	return assertionChange("AddAssertion", req, func(st *registry.State, a registry.Assertion) (string, error) {
		// One that does not hold now is refused by the commit's check:
		// it breaks where the registry before it broke nothing.
		msg := "assertion " + st.Describe(a) + " kept: every change that would break it is refused"
		var unknown []string
		for _, r := range append([]string{a.Reader}, a.Readers...) {
			if _, role := registry.RoleOf(r); r != "" && !role {
				if _, ok := st.Device(r); !ok {
					unknown = append(unknown, r)
				}
			}
		}
		if len(unknown) > 0 {
			msg += "; note: no device " + strings.Join(unknown, ", ") + " is registered (yet): check the spelling"
		}
		return msg, st.AddAssertion(a)
	})
}

// assertionChange is an admin change of one assertion; fn says what
// became of it.
func assertionChange(rpc string, req *api.AssertionRequest, fn func(st *registry.State, a registry.Assertion) (string, error)) change {
	ids := &audit.IDs{Enclave: uint16(req.GetAssertion().GetPair().GetA()), Peer: uint16(req.GetAssertion().GetPair().GetB())}
	return change{rpc, ids, func(st *registry.State) ([]registry.RotationEvent, string, error) {
		a, err := assertionOf(req.GetAssertion())
		if err != nil {
			return nil, "", err
		}
		msg, err := fn(st, a)
		return nil, msg, err
	}}
}

// RemoveAssertion implements api.AdminServer.
func (s *Service) RemoveAssertion(ctx context.Context, req *api.AssertionRequest) (*api.AdminReply, error) {
	return s.apply(ctx, s.removeAssertion(req))
}

func (s *Service) removeAssertion(req *api.AssertionRequest) change {
	return assertionChange("RemoveAssertion", req, func(st *registry.State, a registry.Assertion) (string, error) {
		return "assertion " + st.Describe(a) + " removed", st.RemoveAssertion(a)
	})
}

// CheckAssertions implements api.AdminServer.
func (s *Service) CheckAssertions(ctx context.Context, _ *api.CheckAssertionsRequest) (*api.CheckAssertionsReply, error) {
	const rpc = "CheckAssertions"
	c, err := s.authorize(ctx, rpc, ca.RoleAdmin)
	if err != nil {
		return nil, err
	}
	if err := s.allow(c, rpc, nil, "checking the sight assertions"); err != nil {
		return nil, err
	}
	out := &api.CheckAssertionsReply{Broken: brokenAssertions(c.state, nil)}
	for _, a := range c.state.Assertions {
		out.Assertions = append(out.Assertions, apiAssertion(a))
	}
	return out, nil
}
