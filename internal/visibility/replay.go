package visibility

import (
	"slices"
	"strings"
	"time"

	"github.com/enclavekeys/enclave/internal/audit"
	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/registry"
)

// Replay answers from a key service's audit log who could read a pair at
// a moment: every committed registry change recorded the sight it gave and
// took (audit.Sight entries, one per device, right and kind of change), so
// playing them in order up to the moment gives the readers then. Entries
// of changes the log later voids (not committed, or replaced by a retry)
// are left out, and so are those of a change off the chain of committed
// changes: each change's entry names the change committed before it
// (Follows), and a key service's start names the last one committed, so
// an attempt whose commit a crash lost is left behind by the next change
// or start.
type Replay struct {
	sights []audit.Entry
	voids  map[string]bool
	// follows maps each change to the one committed before it; tip is
	// the newest change the log says (or, for the last change written,
	// assumes) was committed.
	follows map[string]string
	tip     string
	// proven are the changes a later entry names as committed (Follows):
	// a void of one of them is wrong (a store that reported an error for
	// a transaction it applied), and the chain wins.
	proven map[string]bool
	// restored holds the tip each restore of the store (--restored) left
	// behind: those changes were committed, and their readers could
	// read until the restore. The replay keeps them after it too: it errs
	// on the side of naming a reader the restore took away.
	restored []string
	// Unrecorded counts registry changes in the log without a change name:
	// written before the log recorded sight, so the replay cannot see what
	// they did.
	Unrecorded int
	// First and Last are the times of the first and last entries given.
	First, Last time.Time
	// pairNames are the pairs the sight entries name.
	pairNames map[string]bool
	// keeps are the entries that say a change kept or dropped a sight
	// assertion ("kept: DESC", "dropped: DESC"), and the restores.
	keeps []audit.Entry
	// changeAt is when each change's own entry was written: the moment
	// of the change, its sight and assertion entries being written just
	// after it.
	changeAt map[string]time.Time
}

// changeRPCs are the admin RPCs that change the registry.
var changeRPCs = []string{"AddEnclave", "AddDevice", "RevokeDevice", "RemoveDevice", "AllowPair", "ForbidPair", "AddGrant", "RevokeGrant", "Join"}

// assertionRPC is the rpc of the entries that say a change kept or
// dropped a sight assertion
// (keyserver.AuditAssertion: one entry a sight assertion a change kept
// or dropped).
const assertionRPC = "assertion"

// NewReplay returns an empty replay; give it the log's entries in order.
func NewReplay() *Replay {
	return &Replay{voids: map[string]bool{}, follows: map[string]string{}, proven: map[string]bool{}, changeAt: map[string]time.Time{}}
}

// Add takes the log's next entry.
func (r *Replay) Add(e audit.Entry) {
	if r.First.IsZero() {
		r.First = e.Time
	}
	r.Last = e.Time
	for _, v := range e.Voids {
		r.voids[v] = true
	}
	if e.Follows != "" {
		r.proven[e.Follows] = true
	}
	switch {
	case e.RPC == "restore":
		r.restored = append(r.restored, r.tip)
		r.tip = e.Follows
		// In order among the sights and the assertions' changes: from
		// here the registry is the one of the restored tip again.
		r.sights = append(r.sights, e)
		r.keeps = append(r.keeps, e)
	case (e.RPC == "start" || e.RPC == "stop") && e.Follows != "":
		r.tip = e.Follows
	case e.RPC == assertionRPC && e.Change != "" && e.Decision == audit.Allow:
		r.keeps = append(r.keeps, e)
	case e.Change != "" && e.Sight == nil && e.RPC != "rotate" && e.Decision == audit.Allow: // a change's own entry
		r.follows[e.Change], r.tip = e.Follows, e.Change
		r.changeAt[e.Change] = e.Time
	}
	switch {
	case e.Sight != nil && e.IDs != nil && e.Change != "":
		r.sights = append(r.sights, e)
		for _, p := range e.IDs.Pairs {
			if r.pairNames == nil {
				r.pairNames = map[string]bool{}
			}
			r.pairNames[p] = true
		}
	case e.Decision == audit.Allow && e.Change == "" && slices.Contains(changeRPCs, e.RPC):
		r.Unrecorded++
	}
}

// At returns who could read each pair ("A-B") at the moment at, the
// readers ordered as the map orders them (strongest right first).
func (r *Replay) At(at time.Time) map[string][]Reader {
	var out map[string][]Reader
	r.walk(at, func(_ time.Time, readers map[string][]Reader) { out = readers })
	if out == nil {
		out = map[string][]Reader{}
	}
	return out
}

// chain is the set of changes on the chain of committed changes ending
// at tip.
func (r *Replay) chain(tip string) map[string]bool {
	out := map[string]bool{}
	for c := tip; c != "" && !out[c]; c = r.follows[c] {
		out[c] = true
	}
	return out
}

// committed is the set of changes the log shows committed.
func (r *Replay) committed() map[string]bool {
	committed := map[string]bool{}
	for _, tip := range append([]string{r.tip}, r.restored...) {
		// The newest change is taken as committed unless it was voided
		// and nothing after it names it.
		for tip != "" && r.voids[tip] && !r.proven[tip] {
			tip = r.follows[tip]
		}
		for c := tip; c != "" && !committed[c]; c = r.follows[c] {
			committed[c] = true
		}
	}
	return committed
}

// walk plays the committed sight entries up to until in order and calls
// each after every change's entries with the change's time and who could
// read each pair then (a fresh map each call), and once at the end.
func (r *Replay) walk(until time.Time, each func(at time.Time, readers map[string][]Reader)) {
	committed := r.committed()
	type key struct{ pair, device string }
	held := map[key]Reader{}
	emit := func(at time.Time) {
		out := map[string][]Reader{}
		for k, rd := range held {
			out[k.pair] = append(out[k.pair], rd)
		}
		for _, rs := range out {
			slices.SortFunc(rs, func(x, y Reader) int {
				if d := rank(x.Right) - rank(y.Right); d != 0 {
					return d
				}
				return strings.Compare(x.Device, y.Device)
			})
		}
		each(at, out)
	}
	var last string
	var lastAt time.Time
	for i, e := range r.sights {
		if e.Time.After(until) {
			continue
		}
		if e.RPC == "restore" {
			// The restored registry's readers come back: those of the
			// changes on the chain up to its tip. Those the restore took
			// away are kept too (the replay errs on the side of naming
			// a reader).
			if last != "" {
				emit(lastAt)
			}
			chain := r.chain(e.Follows)
			atTip := map[key]Reader{}
			for _, s := range r.sights[:i] {
				if s.Sight == nil || !chain[s.Change] {
					continue
				}
				for _, p := range s.IDs.Pairs {
					switch s.Sight.Change {
					case Gains, Changes:
						atTip[key{p, s.Sight.Device}] = Reader{Device: s.Sight.Device, Role: s.Sight.Role, Right: s.Sight.Right}
					case Loses:
						delete(atTip, key{p, s.Sight.Device})
					}
				}
			}
			for k, rd := range atTip {
				if _, ok := held[k]; !ok {
					held[k] = rd
				}
			}
			last, lastAt = "", e.Time
			emit(e.Time)
			continue
		}
		if !committed[e.Change] {
			continue
		}
		if last != "" && e.Change != last {
			emit(lastAt)
		}
		last, lastAt = e.Change, e.Time
		if at, ok := r.changeAt[e.Change]; ok {
			lastAt = at
		}
		s := e.Sight
		for _, p := range e.IDs.Pairs {
			k := key{p, s.Device}
			switch s.Change {
			case Gains, Changes:
				held[k] = Reader{Device: s.Device, Role: s.Role, Right: s.Right}
			case Loses:
				delete(held, k)
			}
		}
	}
	emit(lastAt)
}

// Unreadable returns a pair the log names that does not read under
// layout l (a layout not the org's), or "".
func (r *Replay) Unreadable(l keys.Layout) string {
	for name := range r.pairNames {
		if _, err := registry.ParsePairIn(l, name); err != nil {
			return name
		}
	}
	return ""
}

// Dotted reports whether the log names sub-enclave pairs (3.2-7): its
// org has a sub-enclave layout, which its pairs read under.
func (r *Replay) Dotted() bool {
	for name := range r.pairNames {
		if strings.Contains(name, ".") {
			return true
		}
	}
	return false
}
