package agent

import (
	"net"
	"net/netip"
	"sync"
	"time"
)

// ownAddrs answers whether a gateway's path entry was made for a handshake
// sent to this server (issue 20, item 11): its control port at one of its
// addresses, or at an address it is reached at through a NAT. A gateway
// signs the destination it sends a handshake to; an entry replayed here
// from a handshake the gateway sent elsewhere names that elsewhere.
type ownAddrs struct {
	ctrl   netip.AddrPort   // the control socket's local address
	public []netip.AddrPort // control addresses in front of a NAT
	now    func() time.Time

	mu        sync.Mutex
	local     map[netip.Addr]bool // the host's addresses, for a wildcard listener
	refreshed time.Time
}

// localRefresh bounds how often a miss rereads the host's addresses: an
// address added since is found within it, and junk entries cannot make
// every handshake list the interfaces.
const localRefresh = 10 * time.Second

func newOwnAddrs(ctrl netip.AddrPort, public []netip.AddrPort, now func() time.Time) *ownAddrs {
	o := &ownAddrs{ctrl: unmapPort(ctrl), now: now}
	for _, p := range public {
		o.public = append(o.public, unmapPort(p))
	}
	return o
}

func unmapPort(a netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(a.Addr().Unmap(), a.Port())
}

// addressed reports whether to is this server's control address.
func (o *ownAddrs) addressed(to netip.AddrPort) bool {
	if !to.IsValid() {
		return false
	}
	to = unmapPort(to)
	for _, p := range o.public {
		if p == to {
			return true
		}
	}
	if to.Port() != o.ctrl.Port() {
		return false
	}
	if !o.ctrl.Addr().IsUnspecified() {
		return to.Addr() == o.ctrl.Addr()
	}
	// A wildcard listener is reached at any of the host's addresses.
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.local[to.Addr()] {
		return true
	}
	if now := o.now(); o.local == nil || now.Sub(o.refreshed) >= localRefresh {
		o.refreshed = now
		o.local = hostAddrs()
		return o.local[to.Addr()]
	}
	return false
}

// hostAddrs lists the addresses of the host's interfaces (of this network
// namespace); none when they cannot be read.
func hostAddrs() map[netip.Addr]bool {
	m := map[netip.Addr]bool{}
	as, err := net.InterfaceAddrs()
	if err != nil {
		return m
	}
	for _, a := range as {
		if p, ok := a.(*net.IPNet); ok {
			if ip, ok := netip.AddrFromSlice(p.IP); ok {
				m[ip.Unmap()] = true
			}
		}
	}
	return m
}
