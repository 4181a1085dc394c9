package control

import (
	"encoding/binary"
	"errors"
	"net/netip"
)

// Relay framing: between an agent started with --via and the relay
// gateway it sends through, every datagram (data or control) carries a
// small header naming the far end: the destination on the way to the
// relay, the origin on the way back. The relay strips it and forwards the
// datagram unchanged; beyond the relay the packets are the ordinary ones.
//
//	[1] magic 0x52 ('R')
//	[1] version 1
//	[1] address family: 4 or 6
//	[1] reserved 0
//	[4 or 16] address
//	[2] port
const (
	RelayMagic = 0x52
	// RelayHeaderV4 and RelayHeaderV6 are the header's lengths.
	RelayHeaderV4 = 4 + 4 + 2
	RelayHeaderV6 = 4 + 16 + 2
	// MaxRelayHeader is the longest relay header.
	MaxRelayHeader = RelayHeaderV6
)

// ErrRelay: a relayed datagram's header is malformed.
var ErrRelay = errors.New("control: malformed relay header")

// RelayHeaderLen is the header's length for an address.
func RelayHeaderLen(a netip.AddrPort) int {
	if a.Addr().Unmap().Is4() {
		return RelayHeaderV4
	}
	return RelayHeaderV6
}

// PutRelayHeader writes the relay header naming a at the start of b, which
// has room for RelayHeaderLen(a) bytes, and returns its length.
func PutRelayHeader(b []byte, a netip.AddrPort) (int, error) {
	ip := a.Addr().Unmap()
	n := RelayHeaderLen(a)
	if !a.IsValid() || ip.IsUnspecified() || a.Port() == 0 || len(b) < n {
		return 0, ErrRelay
	}
	b[0], b[1], b[3] = RelayMagic, 1, 0
	if ip.Is4() {
		b[2] = 4
		v := ip.As4()
		copy(b[4:], v[:])
	} else {
		b[2] = 6
		v := ip.As16()
		copy(b[4:], v[:])
	}
	binary.BigEndian.PutUint16(b[n-2:], a.Port())
	return n, nil
}

// ParseRelayHeader reads the relay header at the start of b: the address
// it names and the header's length.
func ParseRelayHeader(b []byte) (netip.AddrPort, int, error) {
	if len(b) < 4 || b[0] != RelayMagic || b[1] != 1 || b[3] != 0 {
		return netip.AddrPort{}, 0, ErrRelay
	}
	var ip netip.Addr
	var n int
	switch b[2] {
	case 4:
		n = RelayHeaderV4
		if len(b) < n {
			return netip.AddrPort{}, 0, ErrRelay
		}
		ip = netip.AddrFrom4([4]byte(b[4:8]))
	case 6:
		n = RelayHeaderV6
		if len(b) < n {
			return netip.AddrPort{}, 0, ErrRelay
		}
		ip = netip.AddrFrom16([16]byte(b[4:20]))
		if ip.Is4In6() {
			return netip.AddrPort{}, 0, ErrRelay // one spelling per address
		}
	default:
		return netip.AddrPort{}, 0, ErrRelay
	}
	port := binary.BigEndian.Uint16(b[n-2:])
	if ip.IsUnspecified() || port == 0 {
		return netip.AddrPort{}, 0, ErrRelay
	}
	return netip.AddrPortFrom(ip, port), n, nil
}
