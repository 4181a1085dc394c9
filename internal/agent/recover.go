package agent

import (
	"encoding/binary"
	"net/netip"
	"sync"
	"time"

	"github.com/enclavekeys/enclave/internal/control"
	"github.com/enclavekeys/enclave/internal/packet"
)

// Recovery of SAs whose peer lost its state (a restart, a crash, a new
// machine): the side that still sends finds out from the peer's answer
// and makes a new SA, in about a round trip and a handshake once the peer
// is up. Nothing unauthenticated ends an SA or moves a route here: an
// UnknownSA message or a packet of an unknown SPI only prompts a
// handshake, at most once a second per SA or endpoint (docs/PROTOCOL.md).
//
//   - A server that receives a data packet of an SPI it holds no SA for
//     answers UnknownSA (rate-limited per source and in all). A client
//     holding an SA that sends with that SPI to that server makes a new
//     one, the old one carrying on until it is up.
//   - A client that receives a data packet of an SPI it does not know
//     from a server endpoint it routes to (it restarted while the server
//     had data for it) makes an SA with that server.
//   - After every handshake a client sends a keepalive on the new SA (an
//     empty inner packet), so that the server sends on it at once.

// Rates of recovery.
const (
	hintEvery      = 500 * time.Millisecond // UnknownSA answers per source address
	hintsPerSecond = 100                    // UnknownSA answers in all
	recoverEvery   = time.Second            // handshakes prompted per SA or endpoint
	maxRateEntries = 4096                   // addresses a limiter remembers
)

// rateLimiter allows an event per key every interval, and at most perSec
// in all. Its memory is bounded: when full it forgets everything (a flood
// of sources then gets at most perSec events a second, the global cap).
type rateLimiter struct {
	mu       sync.Mutex
	every    time.Duration
	perSec   int
	last     map[netip.Addr]time.Time
	second   time.Time
	inSecond int
}

func newRateLimiter(every time.Duration, perSec int) *rateLimiter {
	return &rateLimiter{every: every, perSec: perSec, last: map[netip.Addr]time.Time{}}
}

// allow reports whether an event for key may happen at now, and counts it.
func (l *rateLimiter) allow(key netip.Addr, now time.Time) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if t, ok := l.last[key]; ok && now.Sub(t) < l.every {
		return false
	}
	if now.Sub(l.second) >= time.Second {
		l.second, l.inSecond = now, 0
	}
	if l.perSec > 0 && l.inSecond >= l.perSec {
		return false
	}
	if len(l.last) >= maxRateEntries {
		clear(l.last)
	}
	l.last[key] = now
	l.inSecond++
	return true
}

// onUnknownSPI handles a data packet of an SPI this agent holds no SA for,
// from src: a server answers UnknownSA; a client makes an SA with the
// server at src, if it routes to it.
func (a *Agent) onUnknownSPI(pkt []byte, src netip.AddrPort) {
	now := a.cfg.Now()
	if !a.server {
		a.recoverFrom(src, now)
		return
	}
	if len(pkt) < packet.HeaderLen || !a.hints.allow(src.Addr(), now) {
		return
	}
	spi := binary.BigEndian.Uint32(pkt[4:8])
	var buf [control.UnknownSALen]byte
	msg, err := control.AppendUnknownSA(buf[:0], spi)
	if err != nil {
		return
	}
	a.metrics.recovery.WithLabelValues("unknown_sa_sent").Inc()
	a.sendControl(msg, controlEndpoint(src))
}

// onUnknownSAHint handles an UnknownSA message from src: a client whose SA
// with that server has that SPI, either way (a server names the SPI it
// received; a gateway on the path that cannot read the SA names either
// direction's), makes a new SA.
func (a *Agent) onUnknownSAHint(src netip.AddrPort, msg []byte) {
	spi, err := control.ParseUnknownSA(msg)
	if err != nil {
		a.metrics.drop("control_malformed")
		return
	}
	if a.server {
		a.metrics.drop("control_unexpected") // servers send these, never act on them
		return
	}
	now := a.cfg.Now()
	a.mu.RLock()
	var found *conn
	for _, c := range a.t.route {
		if (uint32(c.sendSPI) == spi || uint32(c.recvSPI) == spi) && controlEndpoint(c.dataEndpoint()) == src {
			found = c
			break
		}
	}
	a.mu.RUnlock()
	if found == nil {
		a.metrics.recovery.WithLabelValues("unknown_sa_ignored").Inc()
		return
	}
	if last := found.recovered.Load(); last != 0 && now.Sub(time.Unix(0, last)) < recoverEvery {
		a.metrics.recovery.WithLabelValues("unknown_sa_ignored").Inc()
		return
	}
	found.recovered.Store(now.UnixNano())
	a.metrics.recovery.WithLabelValues("rekey").Inc()
	found.rekeying.Store(true)
	a.rekey(found, "the server holds no such SA (it restarted?), or a gateway on the path needs the SA's keys")
}

// recoverFrom makes an SA with the server at src (data port), which sends
// on an SA this client does not hold: it restarted while the server had
// data for it. The route whose endpoint src is says which servers may
// answer: any whose overlay address lies in its prefix.
func (a *Agent) recoverFrom(src netip.AddrPort, now time.Time) {
	var r Route
	found := false
	for _, x := range a.cfg.Routes {
		if x.Endpoint == src {
			r, found = x, true
			break
		}
	}
	if !found || !a.recoveries.allow(src.Addr(), now) {
		return
	}
	key := r.Prefix.Masked().Addr() // a network address: never a peer's own
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.dials[key] != nil {
		return
	}
	a.log.Info("a server sends on an SA this client does not hold: making one", "endpoint", src)
	a.metrics.recovery.WithLabelValues("handshake").Inc()
	d := &dial{dst: key, route: r, anyIn: r.Prefix}
	a.dials[key] = d
	a.startLocked(d)
}

// keepalive sends an empty inner packet on c, so that its server learns
// the client holds it.
func (a *Agent) keepalive(c *conn) {
	buf := make([]byte, packet.Overhead)
	pkt, err := c.out.Seal(buf, packet.NextIPv4, buf[packet.HeaderLen:packet.HeaderLen])
	if err != nil {
		return
	}
	if err := a.writeTo(a.data, pkt, c.dataEndpoint()); err != nil {
		a.metrics.drop("underlay_send")
		return
	}
	a.metrics.recovery.WithLabelValues("keepalive_sent").Inc()
}
