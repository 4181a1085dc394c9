package agent

import (
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/handshake"
	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/replay"
	"github.com/enclavekeys/enclave/internal/sa"
)

// conn is one SA with a peer, both directions, from either side. The
// client side holds both CKs (an Outbound and an Inbound); the server side
// sends with an Outbound and receives through the agent's stateless
// opener, keeping only the replay window here.
type conn struct {
	peer     ca.Identity
	overlay  netip.Addr // the peer's overlay address: the only source accepted
	server   bool       // this agent granted the SA
	vc       keys.VC
	gen      keys.Generation
	recvSPI  keys.SPI
	sendSPI  keys.SPI
	out      *sa.Outbound
	in       *sa.Inbound // client side
	session  *handshake.Session
	ctrl     atomic.Pointer[netip.AddrPort] // the peer's control endpoint
	endpoint atomic.Pointer[netip.AddrPort]
	expires  time.Time
	// certEnds is set when a certificate (the peer's or this agent's)
	// ends before the SA's lifetime would, and capped it there.
	certEnds time.Time

	mu     sync.Mutex // server side: the replay window and the proofs of path
	window replay.Filter
	proofs proofRing
	// lateJoin is when a gateway's rekey request last re-established
	// this SA (server side, under mu): one per SA per lateJoinEvery.
	lateJoin time.Time

	rekeying atomic.Bool // client: a new SA is being made for this one
	// retryAt is when a rekey of this SA that failed is tried again (Unix
	// ns, under the agent's mu; client side; 0: none failed), and backoff
	// the wait after the next failure: a rekey asked for (by the server,
	// an UnknownSA or the SA's age) is tried until one succeeds or the SA
	// ends, never given up.
	retryAt int64
	backoff time.Duration
	// seen: a server's SA has received a data packet (its data endpoint
	// is the client's, no longer the guess beside its control port).
	seen atomic.Bool
	// recovered is when an UnknownSA about this SA last prompted a
	// handshake (Unix ns; client side): one a second at most.
	recovered atomic.Int64
	closed    atomic.Bool
	// confirmed: the peer is known to hold this SA. A server's SA that
	// replaces another with the same client is unconfirmed until the
	// client's first packet on it arrives: until then the server keeps
	// sending on the old SA, as the client may not have the grant yet
	// (make before break, both ways).
	confirmed atomic.Bool
	// lastSeen is when the SA last received a packet (Unix ms of the
	// coarse clock), for the idle timeout (servers) and status.
	lastSeen atomic.Int64
	// created is when the SA was made (its handshake); the traffic
	// counters are for status (each written by one path only: sends by
	// the send path, receipts by the receive path).
	created            time.Time
	txPackets, txBytes atomic.Uint64
	rxPackets, rxBytes atomic.Uint64
	lastSent           atomic.Int64 // Unix ms of the coarse clock
	// due is when the timers next look at this SA (Unix ns) and slot its
	// place in the deadlines plus one (0: not there); both under the
	// agent's lock.
	due  int64
	slot int
}

func (c *conn) dataEndpoint() netip.AddrPort { return *c.endpoint.Load() }

// setEndpoint records where the peer's data port is (at setup, and when it
// roams).
func (c *conn) setEndpoint(ep netip.AddrPort) {
	c.endpoint.Store(&ep)
}

func (c *conn) controlEndpoint() netip.AddrPort {
	if ep := c.ctrl.Load(); ep != nil {
		return *ep
	}
	return netip.AddrPort{}
}

// setControl records where the peer's control port is (at setup, from
// the handshake's source).
func (c *conn) setControl(ep netip.AddrPort) {
	c.ctrl.Store(&ep)
}

// roamControl moves a server SA's control endpoint with its client's data,
// which moved from old to now after the client had been seen sending (a
// restarted relay gives its agents new upstream ports, a pair): the
// control endpoint keeps its place beside the data one (the same offset,
// the new address). The first data packet only replaces the server's
// guess of the data endpoint, leaving the control endpoint where the
// handshake came from (a NAT maps the two ports apart).
func (c *conn) roamControl(old, now netip.AddrPort) {
	ctrl := c.controlEndpoint()
	port := int(now.Port()) + int(ctrl.Port()) - int(old.Port())
	if port <= 0 || port > 65535 {
		port = int(now.Port()) + 1
	}
	c.setControl(netip.AddrPortFrom(now.Addr(), uint16(port)))
}

// accept records an IV of a packet that authenticated (server side) and
// reports whether it is new; a new one is kept as a proof of path with its
// ICV and the coarse time it came (§5.6).
func (c *conn) accept(iv uint64, icv []byte, now int64) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.window.Accept(iv) {
		return false
	}
	c.proofs.record(iv, icv, now)
	return true
}

// tables are the agent's SAs, indexed three ways. They are changed under
// the agent's lock and read under its read lock.
type tables struct {
	// route is the current SA to each peer overlay address (what the send
	// path uses); an older SA of the same peer stays in bySPI and
	// bySession until it ends, so that packets in flight still land.
	route     map[netip.Addr]*conn
	bySPI     map[keys.SPI]*conn
	bySession map[uint32]*conn
	// byPeer lists each peer's SAs (one, two while one replaces
	// another): adding or removing an SA looks at its peer's alone, so
	// that it costs the same with a hundred SAs as with a hundred
	// thousand.
	byPeer map[netip.Addr][]*conn
	// due orders the SAs by when the timers next look at each; idle and
	// rekeyBefore are the agent's settings that decide it.
	due               deadlines
	idle, rekeyBefore time.Duration
}

func newTables(idle, rekeyBefore time.Duration) tables {
	return tables{route: map[netip.Addr]*conn{}, bySPI: map[keys.SPI]*conn{}, bySession: map[uint32]*conn{}, byPeer: map[netip.Addr][]*conn{},
		idle: idle, rekeyBefore: rekeyBefore}
}

// add installs c. A client's SA, or a server's first SA with a peer,
// becomes the route to the peer at once; a server's SA that replaces one
// in use waits for the client's first packet on it (promote). A server
// keeps one such waiting SA per client: an older one that never carried
// a packet is ended (its client made a newer one, say because the grant
// was lost), so that a client that handshakes again and again without
// sending holds two SAs, not one per handshake. It reports how many it
// ended so.
func (t *tables) add(c *conn, now time.Time) (superseded int) {
	if c.server {
		for _, o := range slices.Clone(t.byPeer[c.overlay]) {
			if o.server && o.peer.Name == c.peer.Name && !o.confirmed.Load() && t.route[c.overlay] != o {
				t.remove(o)
				superseded++
			}
		}
	}
	t.bySPI[c.recvSPI] = c
	t.bySession[c.session.Local] = c
	t.byPeer[c.overlay] = append(t.byPeer[c.overlay], c)
	t.schedule(c, t.next(c, now))
	if old := t.route[c.overlay]; c.server && old != nil && !old.closed.Load() {
		return superseded
	}
	t.promote(c, now)
	return superseded
}

// promote makes c the route to its peer. Older SAs of the same peer end
// after the drain time, so that packets in flight still land.
func (t *tables) promote(c *conn, now time.Time) {
	c.confirmed.Store(true)
	for _, o := range t.byPeer[c.overlay] {
		if o != c && o.peer.Name == c.peer.Name && o.expires.After(now.Add(drain)) {
			o.expires = now.Add(drain)
			if at := o.expires.UnixNano(); o.slot != 0 && at < o.due {
				t.schedule(o, at)
			}
		}
	}
	t.route[c.overlay] = c
}

// remove takes c out of every index; the route goes to another SA of the
// same peer if one is still there.
func (t *tables) remove(c *conn) {
	c.closed.Store(true)
	t.unschedule(c)
	delete(t.bySPI, c.recvSPI)
	delete(t.bySession, c.session.Local)
	peers := slices.DeleteFunc(t.byPeer[c.overlay], func(o *conn) bool { return o == c })
	if len(peers) == 0 {
		delete(t.byPeer, c.overlay)
	} else {
		t.byPeer[c.overlay] = peers
	}
	if t.route[c.overlay] != c {
		return
	}
	delete(t.route, c.overlay)
	var best *conn
	for _, o := range peers {
		if best == nil || o.expires.After(best.expires) {
			best = o
		}
	}
	if best != nil {
		t.route[c.overlay] = best
	}
}
