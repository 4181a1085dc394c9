package gateway

import (
	"net/netip"
	"sync"
	"time"
)

// Per-source budget of tagged handshakes: a token bucket per source
// address, refilled at tagRate a second up to tagBurst. Its memory is
// bounded: past maxBudgets sources it starts again empty (a flood from
// many addresses is then bounded by the buckets' burst).
const (
	tagRate    = 50
	tagBurst   = 100
	maxBudgets = 8192
)

type budget struct {
	mu sync.Mutex
	m  map[netip.Addr]*bucket
	// rate a second and burst: zero takes tagRate and tagBurst.
	rate, burst float64
}

type bucket struct {
	tokens float64
	at     time.Time
}

// allow takes one token of src's bucket at now, if it has one.
func (b *budget) allow(src netip.Addr, now time.Time) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.m == nil || len(b.m) >= maxBudgets {
		b.m = map[netip.Addr]*bucket{}
	}
	rate, burst := b.rate, b.burst
	if rate == 0 {
		rate, burst = tagRate, tagBurst
	}
	k := b.m[src]
	if k == nil {
		k = &bucket{tokens: burst, at: now}
		b.m[src] = k
	}
	return k.take(now, rate, burst)
}

// take refills the bucket at rate a second up to burst and takes one
// token, if there is one.
func (k *bucket) take(now time.Time, rate, burst float64) bool {
	k.tokens = min(burst, k.tokens+now.Sub(k.at).Seconds()*rate)
	k.at = now
	if k.tokens < 1 {
		return false
	}
	k.tokens--
	return true
}
