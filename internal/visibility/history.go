package visibility

import (
	"slices"
	"strings"
	"time"

	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/registry"
)

// AssertionHistory is what a key service's audit log says of one sight
// assertion (issue 34): when the registry kept it, and when the readers
// the log records broke it. A break while it was kept is what the key
// service exists to refuse; the log shows whether it ever happened.
type AssertionHistory struct {
	// Assertion is the assertion as the org file and tools write it.
	Assertion string `json:"assertion"`
	// Kept are the spans in which the registry kept it.
	Kept []Span `json:"kept"`
	// Broken are the spans in which the readers broke it, each with every
	// reader that broke it within.
	Broken []Breach `json:"broken"`
}

// Span is a time span; a zero Until is still open (up to the log's end).
type Span struct {
	From  time.Time `json:"from"`
	Until time.Time `json:"until,omitzero"`
}

// overlaps reports whether s and o share a moment (ends excluded: an
// assertion kept by the change that ended a break was not broken then).
func (s Span) overlaps(o Span) bool {
	return (o.Until.IsZero() || s.From.Before(o.Until)) && (s.Until.IsZero() || o.From.Before(s.Until))
}

// Breach is a span in which the readers broke the assertion: why (as it
// first broke, one line a reader), and whether the registry kept it then.
type Breach struct {
	Span
	Why       []string `json:"why"`
	WhileKept bool     `json:"while_kept"`
}

// History replays the log against a, whose ids read under layout l.
func (r *Replay) History(l keys.Layout, a registry.Assertion) AssertionHistory {
	h := AssertionHistory{Assertion: registry.DescribeIn(l, a), Kept: []Span{}, Broken: []Breach{}}
	committed := r.committed()
	var open *Span
	set := func(on bool, at time.Time) {
		switch {
		case on && open == nil:
			h.Kept = append(h.Kept, Span{From: at})
			open = &h.Kept[len(h.Kept)-1]
		case !on && open != nil:
			open.Until, open = at, nil
		}
	}
	for i, e := range r.keeps {
		if e.RPC == "restore" {
			// The restored registry keeps the assertion if the chain up
			// to its tip left it kept.
			chain, on := r.chain(e.Follows), false
			for _, k := range r.keeps[:i] {
				if k.RPC != "restore" && chain[k.Change] {
					if d := keeps(k.Reason, h.Assertion); d != 0 {
						on = d > 0
					}
				}
			}
			set(on, e.Time)
			continue
		}
		if !committed[e.Change] {
			continue
		}
		if d := keeps(e.Reason, h.Assertion); d != 0 {
			at := e.Time
			if t, ok := r.changeAt[e.Change]; ok {
				at = t
			}
			set(d > 0, at)
		}
	}
	var breach *Breach
	r.walk(r.Last, func(at time.Time, readers map[string][]Reader) {
		if at.IsZero() {
			at = r.First
		}
		why := Breaks(l, pairsOf(l, readers), a, "could read")
		switch {
		case len(why) > 0 && breach == nil:
			h.Broken = append(h.Broken, Breach{Span: Span{From: at}, Why: why})
			breach = &h.Broken[len(h.Broken)-1]
		case len(why) > 0:
			// Every reader that broke it within the span, not only the
			// first.
			for _, w := range why {
				if !slices.Contains(breach.Why, w) {
					breach.Why = append(breach.Why, w)
				}
			}
		case breach != nil:
			breach.Until, breach = at, nil
		}
	})
	for i := range h.Broken {
		for _, k := range h.Kept {
			if h.Broken[i].overlaps(k) {
				h.Broken[i].WhileKept = true
			}
		}
	}
	return h
}

// keeps says what an assertion entry's outcome does to the assertion
// desc: +1 kept it, -1 dropped it, 0 neither.
func keeps(outcome, desc string) int {
	switch outcome {
	case "kept: " + desc:
		return +1
	case "dropped: " + desc:
		return -1
	}
	return 0
}

// pairsOf makes the allowed pairs, with their readers, of a replay's
// readers by pair name.
func pairsOf(l keys.Layout, readers map[string][]Reader) []Pair {
	var out []Pair
	for name, rs := range readers {
		p, err := registry.ParsePairIn(l, name)
		if err != nil {
			continue // a name of another layout: not the assertion's
		}
		out = append(out, Pair{A: uint32(p.A), B: uint32(p.B), Name: name, Allowed: true, Readers: rs})
	}
	slices.SortFunc(out, func(x, y Pair) int { return strings.Compare(x.Name, y.Name) })
	return out
}
