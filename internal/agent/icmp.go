package agent

import (
	"encoding/binary"
	"net/netip"
	"sync"
	"time"

	"github.com/enclavekeys/enclave/internal/checksum"
)

// The tunnel is a link with an MTU, and the agent is the router in front
// of it: an inner packet larger than the MTU gets what a router would do
// with it. An IPv4 packet that may be fragmented is fragmented; one with
// Don't Fragment set, and any IPv6 packet, is dropped with an ICMP
// "fragmentation needed" or ICMPv6 "packet too big" error carrying the
// MTU, written back to the stack it came from, so that the sender's path
// MTU discovery learns the tunnel's MTU.

const (
	ipv4HeaderLen = 20
	ipv6HeaderLen = 40
	icmpHeaderLen = 8
	// ICMP errors carry as much of the offending packet as fits in the
	// smallest MTU each protocol guarantees (RFC 1812 4.3.2.3, RFC 4443
	// 2.4(c)).
	icmpv4Max = 576
	icmpv6Max = 1280
	// icmpPerSecond limits the errors sent, as routers do (RFC 1812
	// 4.3.2.8, RFC 4443 2.4(f)).
	icmpPerSecond = 100
)

// tooBigAction is what becomes of an inner packet larger than the MTU.
type tooBigAction int

const (
	tooBigDrop     tooBigAction = iota // malformed, or an error about an error
	tooBigICMP                         // answered with an ICMP error
	tooBigFragment                     // IPv4 without DF: fragmented
)

// tooBig decides what to do with the oversize inner packet p.
func tooBig(p []byte) tooBigAction {
	switch p[0] >> 4 {
	case 4:
		if len(p) < ipv4HeaderLen || int(p[0]&0x0f)*4 < ipv4HeaderLen || int(p[0]&0x0f)*4 > len(p) {
			return tooBigDrop
		}
		if p[6]&0x40 == 0 {
			return tooBigFragment
		}
		// No error about an ICMP error, nor about a fragment other than
		// the first (RFC 1122 3.2.2).
		hl := int(p[0]&0x0f) * 4
		if binary.BigEndian.Uint16(p[6:8])&0x1fff != 0 {
			return tooBigDrop
		}
		if p[9] == 1 && len(p) > hl && isICMPv4Error(p[hl]) {
			return tooBigDrop
		}
		return tooBigICMP
	case 6:
		if len(p) < ipv6HeaderLen {
			return tooBigDrop
		}
		// Next header 58 directly: an ICMPv6 error (types below 128)
		// gets no error back (RFC 4443 2.4(e)).
		if p[6] == 58 && len(p) > ipv6HeaderLen && p[ipv6HeaderLen] < 128 {
			return tooBigDrop
		}
		return tooBigICMP
	}
	return tooBigDrop
}

// isICMPv4Error reports whether an ICMP type is an error message.
func isICMPv4Error(t byte) bool {
	switch t {
	case 3, 4, 5, 11, 12: // unreachable, source quench, redirect, time exceeded, parameter problem
		return true
	}
	return false
}

// icmpTooBig writes into out the ICMP error for the oversize packet p, sent
// from src to p's source, carrying mtu, and returns it. out needs
// icmpv6Max bytes.
func icmpTooBig(out, p []byte, src netip.Addr, mtu int) []byte {
	if p[0]>>4 == 4 {
		n := min(len(p), icmpv4Max-ipv4HeaderLen-icmpHeaderLen)
		total := ipv4HeaderLen + icmpHeaderLen + n
		h := out[:ipv4HeaderLen]
		clear(h)
		h[0] = 0x45
		binary.BigEndian.PutUint16(h[2:], uint16(total))
		h[8], h[9] = 64, 1 // TTL, ICMP
		s := src.As4()
		copy(h[12:16], s[:])
		copy(h[16:20], p[12:16]) // to the packet's source
		binary.BigEndian.PutUint16(h[10:], ^checksum.Sum(0, h))
		m := out[ipv4HeaderLen:total]
		clear(m[:icmpHeaderLen])
		m[0], m[1] = 3, 4 // destination unreachable: fragmentation needed and DF set
		binary.BigEndian.PutUint16(m[6:], uint16(mtu))
		copy(m[icmpHeaderLen:], p[:n])
		binary.BigEndian.PutUint16(m[2:], ^checksum.Sum(0, m))
		return out[:total]
	}
	n := min(len(p), icmpv6Max-ipv6HeaderLen-icmpHeaderLen)
	plen := icmpHeaderLen + n
	h := out[:ipv6HeaderLen]
	clear(h)
	h[0] = 0x60
	binary.BigEndian.PutUint16(h[4:], uint16(plen))
	h[6], h[7] = 58, 64 // ICMPv6, hop limit
	s := src.As16()
	copy(h[8:24], s[:])
	copy(h[24:40], p[8:24])
	m := out[ipv6HeaderLen : ipv6HeaderLen+plen]
	clear(m[:icmpHeaderLen])
	m[0] = 2 // packet too big
	binary.BigEndian.PutUint32(m[4:], uint32(mtu))
	copy(m[icmpHeaderLen:], p[:n])
	// The pseudo-header: addresses, upper-layer length, next header.
	c := checksum.Sum(0, h[8:40])
	c = checksum.Sum(c, []byte{0, 0, byte(plen >> 8), byte(plen), 0, 0, 0, 58})
	binary.BigEndian.PutUint16(m[2:], ^checksum.Sum(c, m))
	return out[:ipv6HeaderLen+plen]
}

// fragment splits the IPv4 packet p (Don't Fragment clear) into fragments
// of at most mtu bytes, calling emit with each (in a buffer reused for the
// next); it reports false if mtu leaves no room for data.
func fragment(p []byte, mtu int, emit func(frag []byte)) bool {
	hl := int(p[0]&0x0f) * 4
	total := min(int(binary.BigEndian.Uint16(p[2:4])), len(p))
	if total < hl {
		return false
	}
	// Later fragments carry only the options marked to be copied (RFC 791).
	later := make([]byte, 0, hl)
	later = append(later, p[:ipv4HeaderLen]...)
	for o := p[ipv4HeaderLen:hl]; len(o) > 0; {
		t := o[0]
		if t == 0 { // end of options
			break
		}
		l := 1
		if t != 1 { // not a no-op: a length follows
			if len(o) < 2 || int(o[1]) < 2 || int(o[1]) > len(o) {
				break
			}
			l = int(o[1])
		}
		if t&0x80 != 0 {
			later = append(later, o[:l]...)
		}
		o = o[l:]
	}
	for len(later)%4 != 0 {
		later = append(later, 0) // end-of-options padding
	}
	data := p[hl:total]
	flags := binary.BigEndian.Uint16(p[6:8])
	base, lastMF := int(flags&0x1fff)*8, flags&0x2000
	buf := make([]byte, mtu)
	head := p[:hl]
	for off := 0; off < len(data); {
		room := (mtu - len(head)) &^ 7
		if room <= 0 {
			return false
		}
		n := min(room, len(data)-off)
		f := buf[:len(head)+n]
		copy(f, head)
		copy(f[len(head):], data[off:off+n])
		f[0] = f[0]&0xf0 | byte(len(head)/4)
		binary.BigEndian.PutUint16(f[2:], uint16(len(f)))
		fl := uint16((base+off)/8) & 0x1fff
		if off+n < len(data) {
			fl |= 0x2000
		} else {
			fl |= lastMF // the last fragment of a fragment keeps its MF
		}
		binary.BigEndian.PutUint16(f[6:], fl)
		f[10], f[11] = 0, 0
		binary.BigEndian.PutUint16(f[10:], ^checksum.Sum(0, f[:len(head)]))
		emit(f)
		off += n
		head = later
	}
	return true
}

// icmpLimiter allows up to icmpPerSecond errors in each second.
type icmpLimiter struct {
	mu     sync.Mutex
	second time.Time
	n      int
}

func (l *icmpLimiter) allow(now time.Time) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if s := now.Truncate(time.Second); !s.Equal(l.second) {
		l.second, l.n = s, 0
	}
	l.n++
	return l.n <= icmpPerSecond
}
