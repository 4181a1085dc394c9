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
	// sources are the buckets (see guardKey).
	sources map[guardKey]*bucket
	// load is an exponentially decaying rate of initiations per second.
	load     float64
	loadTime time.Time
}

type bucket struct {
	tokens float64
	last   time.Time
	scale  float64
}

// NewGuard returns a Guard.
func NewGuard(cfg GuardConfig, now time.Time) *Guard {
	return &Guard{cfg: cfg.withDefaults(), Cookies: NewCookies(now), sources: map[guardKey]*bucket{}, loadTime: now}
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

// sharedFactor: an address's initiations with valid cookies, all its
// ports together, may come this many times faster than one source's (a
// relay or a NAT carries many clients).
const sharedFactor = 50

// guardKey names a bucket: an address's own (initiations without a
// cookie), one address and port's (with a cookie), an address's shared cap
// of those, or its budget of cookie replies.
type guardKey struct {
	src  netip.AddrPort // the port only for kindPort
	kind uint8
}

const (
	kindAddr uint8 = iota
	kindPort
	kindShared
	kindCookies
)

// Admit decides about an initiation from src. An address's own budget
// pays for initiations without a valid cookie; once it is spent, the
// address is answered with cookies (not dropped), and an initiation that
// echoes one is charged to its own address and port: one abuser behind a
// shared address (a relay, a NAT) spends its port's budget, not its
// neighbours'. Under load every initiation must bring a cookie.
func (g *Guard) Admit(src netip.AddrPort, in *control.Initiation, now time.Time) Decision {
	cookie := g.Cookies.Check(src, in, now)
	addr := netip.AddrPortFrom(src.Addr(), 0)
	g.mu.Lock()
	defer g.mu.Unlock()
	if cookie {
		if !g.take(guardKey{addr, kindShared}, now, sharedFactor) || !g.take(guardKey{src, kindPort}, now, 1) {
			return Drop
		}
		g.rate(now)
		g.load++
		return Proceed
	}
	if !g.take(guardKey{addr, kindAddr}, now, 1) {
		// The address's budget is spent: whoever is behind it may prove
		// its port with a cookie (at most as often as the shared cap).
		if !g.take(guardKey{addr, kindCookies}, now, sharedFactor) {
			return Drop
		}
		return SendCookie
	}
	loaded := g.rate(now) > g.cfg.LoadThreshold
	g.load++
	if loaded {
		return SendCookie
	}
	return Proceed
}

// take spends a token of key's bucket (a bucket scale times the usual).
func (g *Guard) take(key guardKey, now time.Time, scale float64) bool {
	b := g.sources[key]
	if b == nil {
		if len(g.sources) >= g.cfg.MaxSources {
			g.sweep(now)
		}
		b = &bucket{tokens: g.cfg.Burst * scale, last: now, scale: scale}
		g.sources[key] = b
	}
	b.tokens = min(g.cfg.Burst*scale, b.tokens+now.Sub(b.last).Seconds()*g.cfg.PerSource*scale)
	b.last = now
	if b.tokens < 1 {
		return false
	}
	b.tokens--
	return true
}

// sweep forgets sources whose buckets are full again (and, if that frees
// nothing, all of them: the table stays bounded under a spoofed flood).
func (g *Guard) sweep(now time.Time) {
	for k, b := range g.sources {
		if b.tokens+now.Sub(b.last).Seconds()*g.cfg.PerSource*b.scale >= g.cfg.Burst*b.scale {
			delete(g.sources, k)
		}
	}
	if len(g.sources) >= g.cfg.MaxSources {
		clear(g.sources)
	}
}
