package gateway

import (
	"net/netip"
	"sync"
	"time"

	"github.com/enclavekeys/enclave/internal/control"
)

// Late join (DESIGN §5.6): a gateway that meets the packets of an SA in a
// pair it is granted but cannot read (it started after the SA was made,
// and cannot derive its keys) asks the SA's server to re-establish it,
// proving with a packet it forwarded that it is on the path. It does not
// know which end is the server: it asks the endpoint each direction's
// packets go to, and only the server, which received them, can check the
// proof. The new handshake then passes the gateway, which gets the keys
// by direct key exchange.

const (
	// retryLateJoin: one request per SA direction this often at most.
	retryLateJoin = 30 * time.Second
	// maxCandidates bounds the SA directions waiting for a late join, and
	// maxPerSource those whose packets come from one address: forged
	// packets with random SPIs from a few sources cannot fill the table.
	maxCandidates = 1024
	maxPerSource  = 64
	// lateFastSA: an SA direction that showed this many packets before
	// its first request waits for a sparse proof.
	lateFastSA = 64
)

// candidate is an SA direction the gateway cannot read, with the newest
// proofs it forwarded.
type candidate struct {
	src            netip.Addr     // where its packets come from
	packets        uint64         // how many were seen (an SA carrying traffic has many)
	dst            netip.AddrPort // where its packets go (a data port)
	latest, sparse control.RekeyRequest
	latestAt       time.Time
	sparseAt       time.Time
	tried          time.Time
	first          time.Time
	// nudged is when the SA's ends were last told it is not held
	// (blind.go), nudges how often.
	nudged time.Time
	nudges int
}

type lateJoin struct {
	mu       sync.Mutex
	m        map[saKey]*candidate
	bySource map[netip.Addr]int
	refused  func() // counts a candidate not taken (the table full of busier ones)
}

func (l *lateJoin) init() { l.m, l.bySource = map[saKey]*candidate{}, map[netip.Addr]int{} }

// observe records an unreadable packet of a granted pair, from src to
// dst, as a proof, and reports whether the SA's ends are due a nudge
// (blind.go; nudged records one sent). A new SA direction takes a free place, or that of the
// candidate that has shown the least (one packet, the longest ago): noise
// of forged packets with random SPIs replaces noise, never an SA that
// carries traffic.
func (l *lateJoin) observe(k saKey, src netip.Addr, dst netip.AddrPort, iv uint64, icv []byte, now time.Time) (nudge bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	c := l.m[k]
	if c == nil {
		if l.bySource[src] >= maxPerSource || (len(l.m) >= maxCandidates && !l.evictLocked(now)) {
			if l.refused != nil {
				l.refused()
			}
			// No room to remember it: its nudge is still due, bounded
			// by its address's budget (blind.go), so that a full table
			// locks no one out.
			return true
		}
		c = &candidate{src: src, first: now}
		l.m[k] = c
		l.bySource[src]++
	}
	if c.src != src {
		// Another sender with this SA's SPI: the first one's proofs and
		// destination stay (someone who saw the SPI cannot redirect the
		// late join or spend the SA's nudges).
		return false
	}
	c.packets++
	c.dst = dst
	c.latest = control.RekeyRequest{SPI: uint32(k.spi), IV: iv}
	copy(c.latest.ICV[:], icv)
	c.latestAt = now
	if iv%control.ProofSparse == 0 {
		c.sparse, c.sparseAt = c.latest, now
	}
	return c.nudges < maxNudges && now.Sub(c.nudged) >= nudgeEvery
}

// nudged records that the SA direction k's ends were told at now.
func (l *lateJoin) nudged(k saKey, now time.Time) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if c := l.m[k]; c != nil {
		c.nudged = now
		c.nudges++
	}
}

// evictLocked makes room: it drops the candidate that has shown the
// least, if it has shown little (at most 2 packets) or nothing lately
// (past the proofs' age); else it keeps them all.
func (l *lateJoin) evictLocked(now time.Time) bool {
	var victim saKey
	var worst *candidate
	for k, c := range l.m {
		if worst == nil || c.packets < worst.packets || (c.packets == worst.packets && c.latestAt.Before(worst.latestAt)) {
			victim, worst = k, c
		}
	}
	if worst == nil || (worst.packets > 2 && now.Sub(worst.latestAt) < control.ProofMaxAge) {
		return false
	}
	l.deleteLocked(victim)
	return true
}

func (l *lateJoin) deleteLocked(k saKey) {
	if c := l.m[k]; c != nil {
		if l.bySource[c.src]--; l.bySource[c.src] <= 0 {
			delete(l.bySource, c.src)
		}
		delete(l.m, k)
	}
}

// refresh replaces req's proof with the best one the gateway holds now
// for its SPI: a request queued while a session was being made is sent
// with a proof the server still remembers.
func (l *lateJoin) refresh(req *control.RekeyRequest, now time.Time) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for k, c := range l.m {
		if uint32(k.spi) != req.SPI {
			continue
		}
		*req = c.latest
		if !c.sparseAt.IsZero() && now.Sub(c.sparseAt) < control.ProofMaxAge/2 {
			*req = c.sparse
		}
		return
	}
}

// forget drops candidates whose keys arrived.
func (l *lateJoin) forget(ks ...saKey) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, k := range ks {
		l.deleteLocked(k)
	}
}

// lateJoinTick sends the rekey requests due: for each unreadable SA
// direction not asked about lately, the best proof (a sparse packet still
// well within the server's memory, else the newest) to the endpoint its
// packets go to, over a session made for it if need be.
func (g *Gateway) lateJoinTick(now time.Time) {
	type due struct {
		ep  netip.AddrPort
		req control.RekeyRequest
	}
	var send []due
	g.late.mu.Lock()
	for k, c := range g.late.m {
		switch {
		case now.Sub(c.latestAt) > 2*retryLateJoin:
			g.late.deleteLocked(k) // the SA went quiet: nothing to join
		case !g.cfg.FailOpen:
			// Held packets never reach the server, so no proof of them
			// can convince it: a held SA's client is nudged instead
			// (blind.go).
		case !c.tried.IsZero() && now.Sub(c.tried) < retryLateJoin:
		case now.Sub(c.latestAt) > control.ProofMaxAge/2:
		case c.sparseAt.IsZero() && c.packets >= lateFastSA && now.Sub(c.first) < time.Second:
			// A busy SA: its newest packet leaves the server's memory of
			// the last few within moments, so wait for one of the sparse
			// ones it keeps longer (one in 1024).
		default:
			c.tried = now
			req := c.latest
			if !c.sparseAt.IsZero() && now.Sub(c.sparseAt) < control.ProofMaxAge/2 {
				req = c.sparse
			}
			send = append(send, due{netip.AddrPortFrom(c.dst.Addr(), c.dst.Port()+1), req})
		}
	}
	g.late.mu.Unlock()
	for _, d := range send {
		g.requestRekey(d.ep, d.req)
	}
}

// requestRekey sends req over the session with ep, or queues it for the
// session being made.
func (g *Gateway) requestRekey(ep netip.AddrPort, req control.RekeyRequest) {
	s := &g.servers
	g.servers.ensure(g, ep, false, netip.Addr{})
	s.mu.Lock()
	ss := s.byEP[ep]
	if ss == nil || (ss.session == nil && ss.init == nil) {
		s.mu.Unlock()
		g.metrics.lateJoin("no_session")
		return
	}
	if ss.init != nil || ss.session == nil {
		if len(ss.requests) < 64 {
			ss.requests = append(ss.requests, req)
		}
		s.mu.Unlock()
		return
	}
	sess, server := ss.session, ss.server.Name
	s.mu.Unlock()
	g.sendRequest(sess, ep, server, &req)
}
