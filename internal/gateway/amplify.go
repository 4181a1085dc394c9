package gateway

import (
	"net/netip"
	"sync"
)

// The anti-amplification limit (DESIGN §8c, after QUIC's rule, RFC 9000
// §8.1). Whatever reaches the gateway may make it send more than it got:
// a handshake grows by the gateway's signed entry, and a need-key or late
// join makes the gateway start a session of its own. Towards an address
// that has not answered the gateway as a server, it sends at most
// ampFactor times the bytes it received addressed there: every
// handshake or data packet on its way to an address adds ampFactor times
// its size to that address's credit, and what the gateway adds is taken
// from it. A tagged handshake the credit does not cover goes on untagged
// (as it came: no growth); a session initiation it does not cover waits
// for more. An address proves itself by completing a session with the
// gateway (an authenticated Response from the server's certificate).
// Both tables are bounded; forgetting an address's credit only lowers
// what may be sent there, and forgetting that it proved itself only
// limits it again.

const (
	ampFactor   = 3
	maxAmpAddrs = 1 << 14
)

type ampLimit struct {
	mu     sync.Mutex
	credit map[netip.Addr]int
	proven map[netip.Addr]bool
}

func (a *ampLimit) init() {
	a.credit, a.proven = map[netip.Addr]int{}, map[netip.Addr]bool{}
}

// received credits dst with n bytes that arrived on their way to it.
func (a *ampLimit) received(dst netip.Addr, n int) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.proven[dst] {
		return
	}
	if _, ok := a.credit[dst]; !ok && len(a.credit) >= maxAmpAddrs {
		clear(a.credit)
	}
	a.credit[dst] = min(a.credit[dst]+ampFactor*n, 1<<30)
}

// spend reports whether the gateway may send n more bytes to dst, and
// takes them from its credit.
func (a *ampLimit) spend(dst netip.Addr, n int) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.proven[dst] {
		return true
	}
	if a.credit[dst] < n {
		return false
	}
	a.credit[dst] -= n
	return true
}

// has reports whether dst's credit covers n more bytes, taking nothing.
func (a *ampLimit) has(dst netip.Addr, n int) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.proven[dst] || a.credit[dst] >= n
}

// prove marks dst as one that answered as a server.
func (a *ampLimit) prove(dst netip.Addr) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if !a.proven[dst] && len(a.proven) >= maxAmpAddrs {
		clear(a.proven)
	}
	a.proven[dst] = true
	delete(a.credit, dst)
}
