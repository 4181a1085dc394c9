package registry

import (
	"fmt"
	"net/netip"

	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/echo"
	"github.com/enclavekeys/enclave/internal/keys"
)

// Overlay addresses (issue 32): an enclave may have a block its devices'
// addresses are handed out from, inside the overlay network certificates
// name. A token or device without an address gets the lowest free one of
// its enclave's block; one given by hand must be free. An address is in
// use while any device record or unused token holds it (revoked and
// removed devices' too: their certificates may still be around).

// Errors of overlay addresses.
var (
	ErrNoAddresses  = fmt.Errorf("%w: the enclave has no address block (enclave addresses --id I --pool PREFIX --network PREFIX), so an address must be given", ErrInvalid)
	ErrAddressesOut = fmt.Errorf("%w: every address of the enclave's block is in use", ErrNotAllowed)
)

// SetAddresses gives enclave id the block pool, inside the overlay network
// network, or takes its block away (both invalid).
func (s *State) SetAddresses(id keys.EnclaveID, pool, network netip.Prefix) error {
	e := s.enclave(id)
	if e == nil {
		return fmt.Errorf("%w: enclave %d", ErrNotFound, id)
	}
	if !pool.IsValid() && !network.IsValid() {
		e.Addresses, e.Network = "", ""
		return nil
	}
	pool, network = pool.Masked(), network.Masked()
	switch {
	case !pool.IsValid() || !network.IsValid():
		return fmt.Errorf("%w: give both the block and the network", ErrInvalid)
	case pool.Addr().Is4() != network.Addr().Is4() || pool.Bits() < network.Bits() || !network.Contains(pool.Addr()):
		return fmt.Errorf("%w: block %s is not inside network %s", ErrInvalid, pool, network)
	case pool.Addr().Is4() && pool.Bits() > 30, !pool.Addr().Is4() && pool.Bits() > 126:
		return fmt.Errorf("%w: block %s holds no device addresses", ErrInvalid, pool)
	}
	for _, o := range s.Enclaves {
		if o.ID == id || o.Addresses == "" {
			continue
		}
		if op, err := netip.ParsePrefix(o.Addresses); err == nil && op.Overlaps(pool) {
			return fmt.Errorf("%w: block %s overlaps enclave %d's %s", ErrExists, pool, o.ID, op)
		}
	}
	e.Addresses, e.Network = pool.String(), network.String()
	return nil
}

func (s *State) enclave(id keys.EnclaveID) *Enclave {
	for i := range s.Enclaves {
		if s.Enclaves[i].ID == id {
			return &s.Enclaves[i]
		}
	}
	return nil
}

// addressHolder names who holds overlay address a (a device, or the
// token of one), or "".
func (s *State) addressHolder(a netip.Addr) string {
	token := ""
	for r := range withPrefix(&s.ix().addrs, addrKey(a)) {
		if !r.token {
			return r.name
		}
		token = r.name + "'s join token"
	}
	return token
}

// claimOverlay checks the overlay address given for device name (a
// prefix as certificates carry it), or, given none, hands out the lowest
// free one of the enclave's block to an agent (a server or client); ""
// when neither applies.
func (s *State) claimOverlay(name string, role ca.Role, enclave keys.EnclaveID, given string) (string, error) {
	if given != "" {
		p, err := netip.ParsePrefix(given)
		if err != nil || p.Addr().Is4In6() || p.Addr().Zone() != "" {
			return "", fmt.Errorf("%w: overlay %q: want an address with its network's prefix length, as 100.64.3.3/16 (IPv4 as itself, not mapped into IPv6)", ErrInvalid, echo.Cut(given))
		}
		if h := s.addressHolder(p.Addr()); h != "" && h != name && h != name+"'s join token" {
			return "", fmt.Errorf("%w: overlay address %s is %s", ErrExists, p.Addr(), h)
		}
		return p.String(), nil
	}
	e := s.enclave(enclave)
	if e == nil || e.Addresses == "" || (role != ca.RoleServer && role != ca.RoleClient) {
		return "", nil
	}
	pool, err := netip.ParsePrefix(e.Addresses)
	if err != nil {
		return "", fmt.Errorf("%w: enclave %d's block %q", ErrInvalid, enclave, e.Addresses)
	}
	network, err := netip.ParsePrefix(e.Network)
	if err != nil {
		return "", fmt.Errorf("%w: enclave %d's network %q", ErrInvalid, enclave, e.Network)
	}
	// The block's first address (its network address) and, in IPv4, its
	// last (broadcast) are never handed out.
	// Every address below the block's hint is held: the search starts
	// there (n adds to a block cost n lookups, not n²).
	last := lastAddr(pool)
	x := s.ix()
	start := pool.Addr().Next()
	if h, ok := x.free[pool]; ok && start.Less(h) {
		start = h
	}
	for a := start; pool.Contains(a) && a != last; a = a.Next() {
		if a == network.Addr() || s.addressHolder(a) != "" {
			continue
		}
		if x.free == nil {
			x.free = map[netip.Prefix]netip.Addr{}
		}
		x.free[pool] = a
		return netip.PrefixFrom(a, network.Bits()).String(), nil
	}
	return "", fmt.Errorf("%w (%s, enclave %d)", ErrAddressesOut, pool, enclave)
}

// lastAddr is the last address of p (its broadcast address in IPv4).
func lastAddr(p netip.Prefix) netip.Addr {
	b := p.Masked().Addr().AsSlice()
	for i := p.Bits(); i < len(b)*8; i++ {
		b[i/8] |= 0x80 >> (i % 8)
	}
	a, _ := netip.AddrFromSlice(b)
	return a
}
