package registry

import (
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/enclavekeys/enclave/internal/echo"
	"github.com/enclavekeys/enclave/internal/keys"
)

// Sub-enclave levels (DESIGN §3a). The org's layout splits every enclave
// id into levels; an enclave of level 2 or deeper is a sub-enclave of the
// one its id's upper parts name (3.2 lies in 3). A pair names two ids and
// has the level of the deeper one; it is the pair of level-L ids of one
// key, EK_L, and covers the devices' enclaves beneath it: pair 3-7 covers
// 3.1-7.2, pair 3.1-7 covers 3.1 with 7 itself (not 7.2).
//
// Rules: Allowed and Forbidden name pairs at any level; for the enclaves
// of two devices the most specific rule covering them decides (the
// deepest), and with none they may not talk. Generations belong to the
// level-1 pair: a rotation of 3-7 rotates every sub-pair beneath.

// Layout is the org's layout (the default, one level of 16 bits, when
// none was set).
func (s *State) Layout() keys.Layout {
	if s.EnclaveLayout == "" {
		return keys.Layout{}
	}
	l, err := keys.ParseLayout(s.EnclaveLayout)
	if err != nil {
		return keys.Layout{} // SetLayout refuses a bad one; a store's is checked at load
	}
	return l
}

// SetLayout sets the org's layout. It is chosen when the org is created:
// a registry with enclaves keeps the one it has.
func (s *State) SetLayout(l keys.Layout) error {
	if l == s.Layout() {
		return nil
	}
	if len(s.Enclaves) > 0 || s.EnclaveLayout != "" {
		// Once chosen it stays, even before the first enclave: two key
		// servers started with different layouts must not take turns.
		return fmt.Errorf("%w: the enclave layout is %s and is set when the organisation is created (its enclaves' keys derive from it)", ErrInvalid, s.Layout())
	}
	s.EnclaveLayout = ""
	if !l.IsDefault() {
		s.EnclaveLayout = l.String()
	}
	return nil
}

// CheckLayout reports whether the stored layout is one this code reads.
func (s *State) CheckLayout() error {
	if s.EnclaveLayout == "" {
		return nil
	}
	if _, err := keys.ParseLayout(s.EnclaveLayout); err != nil {
		return fmt.Errorf("%w: the registry's enclave layout: %v", ErrInvalid, err)
	}
	return nil
}

// ID writes an enclave id as operators type it: dotted down to its level
// ("3", "3.2"), or plain decimal in the default layout.
func (s *State) ID(id keys.EnclaveID) string { return s.Layout().Short(id) }

// PairName writes a pair as ParsePairIn reads it ("3-7", "3.1-7.2").
func (s *State) PairName(p Pair) string { return PairName(s.Layout(), p) }

// PairName writes p under layout l.
func PairName(l keys.Layout, p Pair) string { return l.Short(p.A) + "-" + l.Short(p.B) }

// ParsePairIn parses "I-J" with dotted ids of layout l ("3.1-7.2").
func ParsePairIn(l keys.Layout, s string) (Pair, error) {
	a, b, ok := strings.Cut(strings.TrimSpace(s), "-")
	if !ok {
		return Pair{}, fmt.Errorf("%w: pair %q must be I-J", ErrInvalid, echo.Cut(s))
	}
	i, err := l.ParseID(a)
	if err != nil {
		return Pair{}, fmt.Errorf("%w: pair %q: %v", ErrInvalid, echo.Cut(s), err)
	}
	j, err := l.ParseID(b)
	if err != nil {
		return Pair{}, fmt.Errorf("%w: pair %q: %v", ErrInvalid, echo.Cut(s), err)
	}
	return NewPair(i, j), nil
}

// PairLevel is the level of pair p: its deeper id's.
func (s *State) PairLevel(p Pair) int { return PairLevel(s.Layout(), p) }

// PairLevel is the level of p under layout l.
func PairLevel(l keys.Layout, p Pair) int { return max(l.Level(p.A), l.Level(p.B), 1) }

// At is the pair of level-L prefixes of p's ids: the pair of level L that
// covers p (p itself at p's own level).
func At(l keys.Layout, level int, p Pair) Pair {
	a, _ := l.Prefix(level, p.A)
	b, _ := l.Prefix(level, p.B)
	return NewPair(a, b)
}

// TopEnclave is the level-1 enclave enclave id lies in (id itself at
// level 1).
func (s *State) TopEnclave(id keys.EnclaveID) keys.EnclaveID { return s.Layout().TopEnclave(id) }

// Top is the level-1 pair above p, whose generation p's keys have.
func (s *State) Top(p Pair) Pair { return At(s.Layout(), 1, p) }

// Covers reports whether pair q covers pair p: q is p's level-L pair for
// q's level L (a pair covers itself). For the two enclaves of devices,
// Covers(q, NewPair(i, j)) says whether q's key reads their SAs.
func Covers(l keys.Layout, q, p Pair) bool {
	L := PairLevel(l, q)
	return L <= PairLevel(l, p) && At(l, L, p) == q
}

// rule is the rule given for exactly pair p: allowed or forbidden, ok
// false when there is none.
func (s *State) rule(p Pair) (allowed, ok bool) {
	if slices.Contains(s.Allowed, p) {
		return true, true
	}
	if slices.Contains(s.Forbidden, p) {
		return false, true
	}
	return false, false
}

// Rule is the rule given for exactly pair p: "allow", "forbid" or "" (p
// is decided by a rule above it, or by none).
func (s *State) Rule(p Pair) string {
	allowed, ok := s.rule(p)
	switch {
	case !ok:
		return ""
	case allowed:
		return "allow"
	}
	return "forbid"
}

// decidingRule is the most specific rule covering p (its own, else the
// nearest above), and whether there is one.
func (s *State) decidingRule(p Pair) (Pair, bool, bool) {
	l := s.Layout()
	for L := PairLevel(l, p); L >= 1; L-- {
		q := At(l, L, p)
		if allowed, ok := s.rule(q); ok {
			return q, allowed, true
		}
	}
	return Pair{}, false, false
}

// PairAllowed reports whether the enclaves of pair p may talk: the most
// specific rule covering p allows it.
func (s *State) PairAllowed(p Pair) bool {
	_, allowed, _ := s.decidingRule(p)
	return allowed
}

// Readable reports whether a key of pair p would read anything: p is
// allowed, or a rule beneath it allows a pair.
func (s *State) Readable(p Pair) bool { return s.readable(p) }

// readable is Readable.
func (s *State) readable(p Pair) bool {
	if s.PairAllowed(p) {
		return true
	}
	l := s.Layout()
	for _, q := range s.Allowed {
		if Covers(l, p, q) && s.PairAllowed(q) {
			return true
		}
	}
	return false
}

// checkSub refuses an enclave id the layout cannot hold as an enclave: an
// id with a zero part above its level names no enclave to lie in.
func (s *State) checkSub(id keys.EnclaveID) error {
	l := s.Layout()
	if !l.Nested(id) {
		return fmt.Errorf("%w: enclave %s: every part above its level must name an enclave (layout %s)", ErrInvalid, l.FormatID(id), l)
	}
	if p := l.Parent(id); p != 0 {
		if _, ok := s.Enclave(p); !ok {
			return fmt.Errorf("%w: enclave %s, which sub-enclave %s lies in (add it first)", ErrNotFound, l.Short(p), l.Short(id))
		}
	}
	return nil
}

// Beneath lists the registered enclaves in enclave i, i included, at every
// level below.
func (s *State) Beneath(i keys.EnclaveID) []keys.EnclaveID {
	l := s.Layout()
	L := max(l.Level(i), 1)
	var out []keys.EnclaveID
	for _, e := range s.Enclaves {
		if p, _ := l.Prefix(L, e.ID); p == i && l.Level(e.ID) >= L {
			out = append(out, e.ID)
		}
	}
	return out
}

// SetRules makes the pair rules exactly allow and forbid (an org file
// applied): their enclaves registered, a forbid rule beneath an allowed
// pair, and a generation started for every level-1 pair newly allowed.
func (s *State) SetRules(allow, forbid []Pair, now time.Time) error {
	for _, set := range [][]Pair{allow, forbid} {
		for _, p := range set {
			for _, e := range []keys.EnclaveID{p.A, p.B} {
				if _, ok := s.Enclave(e); !ok {
					return fmt.Errorf("%w: enclave %s of pair %s", ErrNotFound, s.ID(e), s.PairName(p))
				}
			}
		}
	}
	next := &State{EnclaveLayout: s.EnclaveLayout, Allowed: slices.Clone(allow), Forbidden: slices.Clone(forbid)}
	for _, p := range forbid {
		if slices.Contains(allow, p) {
			return fmt.Errorf("%w: pair %s is both allowed and forbidden", ErrInvalid, s.PairName(p))
		}
		next.Forbidden = slices.DeleteFunc(slices.Clone(forbid), func(x Pair) bool { return x == p })
		if !next.PairAllowed(p) {
			return fmt.Errorf("%w: forbid %s lies beneath no allowed pair (a pair no rule allows is forbidden already)", ErrInvalid, s.PairName(p))
		}
	}
	s.Allowed, s.Forbidden = slices.Clone(allow), slices.Clone(forbid)
	slices.SortFunc(s.Allowed, ComparePairs)
	s.Allowed = slices.Compact(s.Allowed)
	slices.SortFunc(s.Forbidden, ComparePairs)
	s.Forbidden = slices.Compact(s.Forbidden)
	for _, p := range s.Allowed {
		top := s.Top(p)
		if _, ok := s.generation(top); !ok {
			s.Generations = append(s.Generations, Generation{Pair: top, Current: 1, RotatedAt: now.UTC()})
		}
	}
	slices.SortFunc(s.Generations, func(a, b Generation) int { return ComparePairs(a.Pair, b.Pair) })
	return nil
}
