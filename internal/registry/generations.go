package registry

import (
	"fmt"
	"slices"
	"time"

	"github.com/enclavekeys/enclave/internal/keys"
)

// Rotation is the rotation policy (DESIGN §3).
type Rotation struct {
	// Interval is the scheduled rotation period (default 24 h).
	Interval time.Duration
	// Grace is how long the previous generation stays accepted after a
	// rotation, and the least time between two rotations of a pair.
	Grace time.Duration
}

// Defaults of Rotation.
const (
	DefaultInterval = 24 * time.Hour
	DefaultGrace    = time.Hour
)

// WithDefaults fills zero fields.
func (r Rotation) WithDefaults() Rotation {
	if r.Interval <= 0 {
		r.Interval = DefaultInterval
	}
	if r.Grace <= 0 {
		r.Grace = DefaultGrace
	}
	return r
}

// Outcome says what a rotation request did.
type Outcome string

// Outcomes of a rotation request.
const (
	// Rotated: the pair moved to the next generation now.
	Rotated Outcome = "rotated"
	// Delayed: the last rotation was within grace; the rotation is
	// scheduled for when grace ends.
	Delayed Outcome = "delayed"
	// Coalesced: a delayed rotation was already pending; this request
	// joins it.
	Coalesced Outcome = "coalesced"
	// Hurried: rotated now at the operator's word although the last
	// rotation was within grace: the generation before the previous one
	// is no longer accepted (SAs still on it end and are re-established).
	Hurried Outcome = "hurried"
)

// Took reports whether the pair moved to a new generation (now).
func (o Outcome) Took() bool { return o == Rotated || o == Hurried }

// RotationEvent records one rotation decision.
type RotationEvent struct {
	Pair       Pair
	Outcome    Outcome
	Generation keys.Generation // the pair's current generation afterwards
	Reason     string
	At         time.Time // when it took or will take effect
}

func (s *State) generation(p Pair) (*Generation, bool) {
	for i := range s.Generations {
		if s.Generations[i].Pair == p {
			return &s.Generations[i], true
		}
	}
	return nil, false
}

// Generation returns the generation state of a pair, that of the level-1
// pair above it (a sub-pair has its level-1 pair's generations).
func (s *State) Generation(p Pair) (Generation, bool) {
	g, ok := s.generation(s.Top(p))
	if !ok {
		return Generation{}, false
	}
	return *g, true
}

// Accepted lists the generations accepted at now: the current one, and
// the previous one until PreviousUntil.
func (g *Generation) Accepted(now time.Time) []keys.Generation {
	if g.Current > 1 && now.Before(g.PreviousUntil) {
		return []keys.Generation{g.Current, g.Current - 1}
	}
	return []keys.Generation{g.Current}
}

// RequestRotation rotates pair p now if its last rotation is at least grace
// old; otherwise it delays the rotation to the end of grace (recording the
// reason), or joins a rotation already delayed. A pair never rotates twice
// within grace.
func (s *State) RequestRotation(p Pair, reason string, now time.Time, r Rotation) (RotationEvent, error) {
	r = r.WithDefaults()
	if err := s.checkTop(p); err != nil {
		return RotationEvent{}, err
	}
	g, ok := s.generation(p)
	if !ok {
		return RotationEvent{}, fmt.Errorf("%w: pair %s has no generation (is it allowed?)", ErrNotFound, p)
	}
	now = now.UTC()
	earliest := g.RotatedAt.Add(r.Grace)
	switch {
	case !now.Before(earliest):
		s.rotate(g, now, r, reason)
		return RotationEvent{p, Rotated, g.Current, reason, now}, nil
	case !g.PendingAt.IsZero():
		return RotationEvent{p, Coalesced, g.Current, reason, g.PendingAt}, nil
	default:
		g.PendingAt, g.PendingReason = earliest, reason
		return RotationEvent{p, Delayed, g.Current, reason, earliest}, nil
	}
}

// RotateNow rotates pair p now whatever its last rotation: the current
// generation becomes the previous one, accepted for grace. Within grace of
// the last rotation the generation before that stops being accepted at
// once (Hurried): the operator asked for it (a key is feared lost, say).
func (s *State) RotateNow(p Pair, reason string, now time.Time, r Rotation) (RotationEvent, error) {
	r = r.WithDefaults()
	if err := s.checkTop(p); err != nil {
		return RotationEvent{}, err
	}
	g, ok := s.generation(p)
	if !ok {
		return RotationEvent{}, fmt.Errorf("%w: pair %s has no generation (is it allowed?)", ErrNotFound, p)
	}
	now = now.UTC()
	out := Rotated
	if g.Current > 1 && now.Before(g.PreviousUntil) {
		out = Hurried
	}
	s.rotate(g, now, r, reason)
	return RotationEvent{p, out, g.Current, reason, now}, nil
}

// checkTop refuses a rotation of a sub-pair: generations belong to the
// level-1 pair (DESIGN §3a).
func (s *State) checkTop(p Pair) error {
	if top := s.Top(p); top != p {
		return fmt.Errorf("%w: pair %s is a sub-pair; rotation is per level-1 pair: rotate %s (every sub-pair beneath rotates with it)", ErrInvalid, s.PairName(p), s.PairName(top))
	}
	return nil
}

func (s *State) rotate(g *Generation, now time.Time, r Rotation, reason string) {
	g.Current++
	g.Reason = reason
	g.RotatedAt = now
	g.PreviousUntil = now.Add(r.Grace)
	g.PendingAt, g.PendingReason = time.Time{}, ""
}

// RotateEnclave requests a rotation of every allowed pair touching enclave
// i (a device entered or left it, or was revoked).
func (s *State) RotateEnclave(i keys.EnclaveID, reason string, now time.Time, r Rotation) ([]RotationEvent, error) {
	if _, ok := s.Enclave(i); !ok {
		return nil, fmt.Errorf("%w: enclave %d", ErrNotFound, i)
	}
	var out []RotationEvent
	for _, p := range s.PairsOf(i) {
		ev, err := s.RequestRotation(p, reason, now, r)
		if err != nil {
			return out, err
		}
		out = append(out, ev)
	}
	return out, nil
}

// Tick carries out what is due at now: delayed rotations whose time has
// come, and scheduled rotations of pairs whose generation is Interval old.
func (s *State) Tick(now time.Time, r Rotation) []RotationEvent {
	r = r.WithDefaults()
	now = now.UTC()
	var out []RotationEvent
	for i := range s.Generations {
		g := &s.Generations[i]
		if !s.readable(g.Pair) {
			continue
		}
		switch {
		case !g.PendingAt.IsZero() && !now.Before(g.PendingAt):
			reason := g.PendingReason + " (delayed)"
			s.rotate(g, now, r, reason)
			out = append(out, RotationEvent{g.Pair, Rotated, g.Current, reason, now})
		case now.Sub(g.RotatedAt) >= r.Interval:
			s.rotate(g, now, r, "scheduled")
			out = append(out, RotationEvent{g.Pair, Rotated, g.Current, "scheduled", now})
		}
	}
	return out
}

// NextDue is the earliest time Tick has something to do (zero if nothing is
// allowed).
func (s *State) NextDue(r Rotation) time.Time {
	r = r.WithDefaults()
	var next time.Time
	for _, g := range s.Generations {
		if !s.readable(g.Pair) {
			continue
		}
		due := g.RotatedAt.Add(r.Interval)
		if !g.PendingAt.IsZero() && g.PendingAt.Before(due) {
			due = g.PendingAt
		}
		if next.IsZero() || due.Before(next) {
			next = due
		}
	}
	return next
}

// Changes lists what moved from prev to s: pairs whose generation rose (as
// Rotated events, with the reason recorded for the new generation), and
// devices revoked since. Replicas use it to tell their watchers of changes
// another replica made.
func (s *State) Changes(prev *State) ([]RotationEvent, []string) {
	var rot []RotationEvent
	for _, g := range s.Generations {
		old, ok := prev.Generation(g.Pair)
		if !ok || g.Current > old.Current {
			if ok || g.Current > 1 {
				rot = append(rot, RotationEvent{g.Pair, Rotated, g.Current, g.Reason, g.RotatedAt})
			}
		}
	}
	var revoked []string
	check := func(d Device) {
		if !d.Revoked {
			return
		}
		if old, ok := prev.Device(d.Name); !ok || !old.Revoked {
			revoked = append(revoked, d.Name)
		}
	}
	if s.ForkedFrom(prev) { // only the devices the change touched
		for name := range s.Devices.Changed() {
			if d, ok := s.Device(name); ok {
				check(d)
			}
		}
		slices.Sort(revoked)
		return rot, revoked
	}
	for d := range s.Devices.All() {
		check(d)
	}
	return rot, revoked
}

// PolicyChanges lists what else moved from prev to s that changes what a
// device may hold: pairs allowed or forbidden since, and devices whose grant
// changed (added, widened, narrowed or withdrawn). Replicas tell watchers
// of them, who fetch their keys again.
func (s *State) PolicyChanges(prev *State) (pairs []Pair, grants []string) {
	// Every pair with a rule on either side whose rule changed (levels.go:
	// a forbid beneath an allow is a rule too).
	for _, set := range [][]Pair{s.Allowed, s.Forbidden, prev.Allowed, prev.Forbidden} {
		for _, p := range set {
			a, aok := s.rule(p)
			b, bok := prev.rule(p)
			if (a != b || aok != bok) && !slices.Contains(pairs, p) {
				pairs = append(pairs, p)
			}
		}
	}
	names := map[string]bool{}
	for _, g := range s.Grants {
		names[g.Device] = true
	}
	for _, g := range prev.Grants {
		names[g.Device] = true
	}
	for name := range names {
		a, aok := s.Grant(name)
		b, bok := prev.Grant(name)
		if aok != bok || a.All != b.All || !slices.Equal(a.Pairs, b.Pairs) {
			grants = append(grants, name)
		}
	}
	slices.Sort(grants)
	return pairs, grants
}
