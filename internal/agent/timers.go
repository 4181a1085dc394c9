package agent

import (
	"net/netip"
	"time"

	"github.com/enclavekeys/enclave/internal/control"
)

// tick is how often the timers run.
const tick = 200 * time.Millisecond

// timers retransmits initiations that got no answer, re-establishes SAs
// before their lifetime ends (clients), and removes SAs whose lifetime has
// ended or that have been idle too long (servers). It looks only at the
// SAs whose time has come (the deadlines), however many there are.
func (a *Agent) timers() {
	t := time.NewTicker(tick)
	defer t.Stop()
	for {
		select {
		case <-a.ctx.Done():
			return
		case <-t.C:
			a.tick(a.cfg.Now())
		}
	}
}

func (a *Agent) tick(now time.Time) {
	a.coarse.Store(now.UnixMilli())
	a.expireDeliveries(now)
	type rekey struct {
		c   *conn
		why string
	}
	var rekeys []rekey
	var unanswered, answeredBadly [][]any // logged after the lock
	a.mu.Lock()
	for dst, d := range a.dials {
		if d.resolving || now.Sub(d.sent) < handshakeTimeout {
			continue
		}
		if d.tries >= handshakeTries {
			delete(a.dials, dst)
			delete(a.resolved, dst) // a directory answer that led nowhere is asked again
			if d.init != nil {
				delete(a.pending, d.init.Sender())
			}
			if d.replaces != nil {
				a.rekeyFailedLocked(d.replaces, now)
			}
			a.metrics.handshake("initiator", "failed", "timeout")
			a.metrics.drops.WithLabelValues("handshake_timeout").Add(float64(len(d.queue)))
			ep := d.route.Endpoint
			args := []any{"peer", dst, "control", netip.AddrPortFrom(ep.Addr(), ep.Port()+1), "tries", d.tries, "dropped", len(d.queue), "initiation_bytes", len(d.msg)}
			if a.cfg.Via.IsValid() {
				args = append(args, "via", a.cfg.Via)
			}
			if d.answerErr != nil {
				// Answered, but not by anyone this agent can trust: say why.
				answeredBadly = append(answeredBadly, append(args, "err", d.answerErr.Error()))
				continue
			}
			unanswered = append(unanswered, args)
			continue
		}
		a.startLocked(d)
	}
	defer func() {
		for _, args := range answeredBadly {
			a.log.Warn("handshake failed: the peer answered, but its answer did not verify (an expired or untrusted certificate: see err)", args...)
		}
		for _, args := range unanswered {
			a.log.Warn("no answer to the handshake: is an agent listening there, are its UDP ports open, and does the path carry datagrams of this size without fragments (a gateway may add up to 36 bytes a stub)?", args...)
		}
	}()
	var expired, idle, certEnded []*conn
	nowMs, nowNs := now.UnixMilli(), now.UnixNano()
	for len(a.t.due) > 0 && a.t.due[0].due <= nowNs {
		c := a.t.due[0]
		switch {
		case !now.Before(c.expires):
			expired = append(expired, c)
			a.t.remove(c)
			if !c.certEnds.IsZero() {
				a.metrics.ended.WithLabelValues("certificate_expired").Inc()
				certEnded = append(certEnded, c)
			} else {
				a.metrics.ended.WithLabelValues("lifetime").Inc()
			}
			continue
		case c.server && a.cfg.IdleTimeout > 0 && c.lastSeen.Load() < nowMs-a.cfg.IdleTimeout.Milliseconds():
			expired = append(expired, c)
			idle = append(idle, c)
			a.t.remove(c)
			a.metrics.ended.WithLabelValues("idle").Inc()
			continue
		case !c.server && c.retryAt != 0 && c.retryAt <= nowNs && a.t.route[c.overlay] == c &&
			c.rekeying.CompareAndSwap(false, true):
			rekeys = append(rekeys, rekey{c, "a rekey that failed, tried again"})
		case !c.server && c.retryAt == 0 && !now.Before(c.expires.Add(-a.cfg.RekeyBefore)) && a.t.route[c.overlay] == c &&
			// An SA a certificate cut short that was itself made within
			// the last RekeyBefore gains nothing from another rekey
			// (the same certificate caps the next): no storm of them.
			(c.certEnds.IsZero() || c.created.Before(c.certEnds.Add(-a.cfg.RekeyBefore))) &&
			c.rekeying.CompareAndSwap(false, true):
			rekeys = append(rekeys, rekey{c, "lifetime"})
		}
		a.t.schedule(c, max(a.t.next(c, now), nowNs+1)) // looked at: not again this tick
	}
	n := len(a.t.bySPI)
	a.mu.Unlock()
	if len(expired) > 0 {
		a.metrics.sas.Set(float64(n))
	}
	for _, c := range certEnded {
		a.endedByCert(c)
	}
	if a.certWarn.Due(now, a.creds.Load().Expires()) {
		a.checkOwnCert(now)
	}
	for _, r := range rekeys {
		a.rekey(r.c, r.why)
	}
	// An idle SA's client is told, so that its next packet makes a new
	// SA instead of meeting a server that forgot this one.
	for _, c := range idle {
		a.notify(c, &control.Inner{Type: control.InnerClose, Close: control.RekeyLifetime})
	}
}
