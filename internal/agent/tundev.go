package agent

import (
	"fmt"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.zx2c4.com/wireguard/tun"
)

// openTUN creates the kernel TUN device name (wireguard-go's tun package,
// with its offloads: TSO segments come split, GRO coalesces what is
// written) with mtu, gives it this device's overlay address with its
// network's prefix, brings it up, and routes each peer prefix outside that
// network to it. It needs CAP_NET_ADMIN.
func openTUN(name string, mtu int, self netip.Prefix, routes []Route) (tun.Device, error) {
	dev, err := tun.CreateTUN(name, mtu)
	if err != nil {
		return nil, fmt.Errorf("agent: creating TUN device %q: %w (it needs CAP_NET_ADMIN, and /dev/net/tun open to this user: mode 0666 on most systems)", name, err)
	}
	fail := func(what string, err error) (tun.Device, error) {
		dev.Close()
		return nil, fmt.Errorf("agent: TUN device %q: %s: %w", name, what, err)
	}
	real, err := dev.Name()
	if err != nil {
		return fail("name", err)
	}
	link, err := netlink.LinkByName(real)
	if err != nil {
		return fail("link", err)
	}
	addr := &netlink.Addr{IPNet: ipNet(self, false)}
	if err := netlink.AddrAdd(link, addr); err != nil {
		return fail("address "+self.String(), err)
	}
	if err := netlink.LinkSetUp(link); err != nil {
		return fail("up", err)
	}
	network := self.Masked()
	for _, r := range routes {
		if network.Contains(r.Prefix.Addr()) && r.Prefix.Bits() >= network.Bits() {
			continue // inside the device's own network: already routed to it
		}
		rt := &netlink.Route{LinkIndex: link.Attrs().Index, Dst: ipNet(r.Prefix, true)}
		if err := netlink.RouteReplace(rt); err != nil {
			return fail("route "+r.Prefix.String(), err)
		}
	}
	return dev, nil
}

// ipNet turns a prefix into the net package's form; masked zeroes the host
// bits (a route), else the address is kept (an interface address).
func ipNet(p netip.Prefix, masked bool) *net.IPNet {
	if masked {
		p = p.Masked()
	}
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}
