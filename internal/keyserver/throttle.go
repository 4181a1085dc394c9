package keyserver

import (
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/enclavekeys/enclave/internal/audit"
)

// Refusal throttling: a caller that keeps being refused (a revoked device
// retrying, a misconfigured one, an attacker probing) costs the service a
// registry lookup and an fsynced audit line per attempt. Each identity has
// a budget of refusals, a token bucket; past it, its calls are answered
// ResourceExhausted at once, and its refusals are no longer audited one by
// one but counted and written as one summary line per RPC each flush.
const (
	refusalBurst   = 20               // refusals in a row before throttling
	refusalRefill  = time.Second      // one more refusal allowed per this
	flushInterval  = 10 * time.Second // how often summaries are written
	maxThrottled   = 100_000          // identities tracked at most
	throttleReason = "refused too often; retry later"
)

// throttle tracks refusals per caller identity. Safe for concurrent use.
type throttle struct {
	mu      sync.Mutex
	callers map[string]*refusals
}

// refusals is one identity's bucket and its unrecorded refusals.
type refusals struct {
	role   string
	tokens float64
	last   time.Time
	quiet  map[string]int // RPC -> refusals not audited one by one
	since  time.Time      // the first of them
}

func newThrottle() *throttle { return &throttle{callers: map[string]*refusals{}} }

// state returns id's bucket, refilled to now.
func (t *throttle) state(id, role string, now time.Time) *refusals {
	r := t.callers[id]
	if r == nil {
		if len(t.callers) >= maxThrottled {
			t.evict()
		}
		r = &refusals{role: role, tokens: refusalBurst, last: now}
		t.callers[id] = r
	}
	if d := now.Sub(r.last); d > 0 {
		r.tokens = min(refusalBurst, r.tokens+float64(d)/float64(refusalRefill))
		r.last = now
	}
	return r
}

// evict forgets identities with a full bucket and nothing to report; the
// map is bounded even against a CA that issued very many certificates.
func (t *throttle) evict() {
	for id, r := range t.callers {
		if r.tokens >= refusalBurst && len(r.quiet) == 0 {
			delete(t.callers, id)
		}
	}
}

// admit reports whether id may be served now. A throttled call is counted
// with its refusals.
func (t *throttle) admit(id, role, rpc string, now time.Time) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if _, ok := t.callers[id]; !ok {
		return true // never refused: nothing to throttle
	}
	r := t.state(id, role, now)
	if r.tokens >= 1 {
		return true
	}
	r.note(rpc, now)
	return false
}

// refused charges a refusal to id and reports whether it is to be audited
// on its own line (false once the budget is spent: it is summarised).
func (t *throttle) refused(id, role, rpc string, now time.Time) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	r := t.state(id, role, now)
	r.tokens--
	if r.tokens >= 0 {
		return true
	}
	r.tokens = max(r.tokens, -refusalBurst) // bounded debt: a pause, not a ban
	r.note(rpc, now)
	return false
}

func (r *refusals) note(rpc string, now time.Time) {
	if r.quiet == nil {
		r.quiet, r.since = map[string]int{}, now
	}
	r.quiet[rpc]++
}

// flush returns one summary entry per identity and RPC for the refusals
// not audited one by one since the last flush, in a stable order.
func (t *throttle) flush(now time.Time) []audit.Entry {
	t.mu.Lock()
	defer t.mu.Unlock()
	var out []audit.Entry
	// Callers without a certificate (joining hosts, one bucket per source)
	// are summed into one line, however many sources there are: an
	// attacker with a /48 must not buy a line per /64 every flush.
	var joins, joinSources int
	var joinSince time.Time
	var top string
	topN := 0
	for id, r := range t.callers {
		if strings.HasPrefix(id, "join:") {
			n := 0
			for _, c := range r.quiet {
				n += c
			}
			if n > 0 {
				joins, joinSources = joins+n, joinSources+1
				if joinSince.IsZero() || r.since.Before(joinSince) {
					joinSince = r.since
				}
				if n > topN {
					top, topN = strings.TrimPrefix(id, "join:"), n
				}
			}
			r.quiet = nil
			continue
		}
		for rpc, n := range r.quiet {
			out = append(out, audit.Entry{Caller: id, Role: r.role, RPC: rpc, Decision: audit.Deny,
				Reason: fmt.Sprintf("%d more refused or throttled calls from %s to %s, not listed one by one (more than %d refusals in a row)",
					n, r.since.UTC().Format(time.RFC3339), now.UTC().Format(time.RFC3339), refusalBurst)})
		}
		r.quiet = nil
	}
	if joins > 0 {
		out = append(out, audit.Entry{Caller: joinAll, Role: "join", RPC: "Join", Decision: audit.Deny,
			Reason: fmt.Sprintf("%d more refused or throttled joins from %d sources (the most, %d, from %s) from %s to %s, not listed one by one",
				joins, joinSources, topN, top, joinSince.UTC().Format(time.RFC3339), now.UTC().Format(time.RFC3339))})
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].Caller != out[j].Caller {
			return out[i].Caller < out[j].Caller
		}
		return out[i].RPC < out[j].RPC
	})
	return out
}
