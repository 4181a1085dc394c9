package handshake

import (
	"net/netip"
	"sync"
	"time"

	"github.com/enclavekeys/enclave/internal/control"
)

// Decision is what Guard says to do with an initiation.
type Decision int

// The decisions.
const (
	// Proceed: do the handshake.
	Proceed Decision = iota
	// SendCookie: answer with a CookieReply and nothing else.
	SendCookie
	// Drop: too many initiations from this source; answer nothing.
	Drop
)

// GuardConfig sets a Guard's limits; zero fields take the defaults.
type GuardConfig struct {
	// PerSource is how many initiations a second one source address may
	// send (Burst at once).
	PerSource float64
	Burst     float64
	// LoadThreshold is the rate of initiations (all sources, per second)
	// above which the responder is under load and demands cookies.
	LoadThreshold float64
	// MaxSources bounds the per-source table.
	MaxSources int
}

func (c GuardConfig) withDefaults() GuardConfig {
	if c.PerSource == 0 {
		c.PerSource = 20
	}
	if c.Burst == 0 {
		c.Burst = 10
	}
	if c.LoadThreshold == 0 {
		c.LoadThreshold = 200
	}
	if c.MaxSources == 0 {
		c.MaxSources = 65536
	}
	return c
}

// Guard protects a responder from floods of initiations (DESIGN §5.8): a
// token bucket per source address, and, when all sources together exceed
// LoadThreshold a second, a cookie demanded before any Diffie-Hellman or
// signature check. Safe for concurrent use.
type Guard struct {
	cfg     GuardConfig
	Cookies *Cookies
	mu      sync.Mutex
	sources map[netip.Addr]*bucket
	// load is an exponentially decaying rate of initiations per second.
	load     float64
	loadTime time.Time
}

type bucket struct {
	tokens float64
	last   time.Time
}

// NewGuard returns a Guard.
func NewGuard(cfg GuardConfig, now time.Time) *Guard {
	return &Guard{cfg: cfg.withDefaults(), Cookies: NewCookies(now), sources: map[netip.Addr]*bucket{}, loadTime: now}
}

// UnderLoad reports whether cookies are demanded now.
func (g *Guard) UnderLoad(now time.Time) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.rate(now) > g.cfg.LoadThreshold
}

// rate decays the load estimate to now (a one-second time constant).
func (g *Guard) rate(now time.Time) float64 {
	if d := now.Sub(g.loadTime).Seconds(); d > 0 {
		decay := 1 - d
		if decay < 0 {
			decay = 0
		}
		g.load *= decay
		g.loadTime = now
	}
	return g.load
}

// Admit decides about an initiation from src.
func (g *Guard) Admit(src netip.AddrPort, in *control.Initiation, now time.Time) Decision {
	g.mu.Lock()
	b := g.sources[src.Addr()]
	if b == nil {
		if len(g.sources) >= g.cfg.MaxSources {
			g.sweep(now)
		}
		b = &bucket{tokens: g.cfg.Burst, last: now}
		g.sources[src.Addr()] = b
	}
	b.tokens = min(g.cfg.Burst, b.tokens+now.Sub(b.last).Seconds()*g.cfg.PerSource)
	b.last = now
	if b.tokens < 1 {
		g.mu.Unlock()
		return Drop
	}
	b.tokens--
	loaded := g.rate(now) > g.cfg.LoadThreshold
	g.load++
	g.mu.Unlock()
	if loaded && !g.Cookies.Check(src, in, now) {
		return SendCookie
	}
	return Proceed
}

// sweep forgets sources whose buckets are full again (and, if that frees
// nothing, all of them: the table stays bounded under a spoofed flood).
func (g *Guard) sweep(now time.Time) {
	for a, b := range g.sources {
		if b.tokens+now.Sub(b.last).Seconds()*g.cfg.PerSource >= g.cfg.Burst {
			delete(g.sources, a)
		}
	}
	if len(g.sources) >= g.cfg.MaxSources {
		clear(g.sources)
	}
}
