package agent

import (
	"bytes"
	"encoding/binary"
	"math/rand/v2"
	"net/netip"
	"testing"
	"time"

	"github.com/enclavekeys/enclave/internal/checksum"
	"github.com/google/gopacket"
	"github.com/google/gopacket/layers"
)

// v4 builds an IPv4 packet: header with options opts, protocol proto,
// flags and fragment offset field frag, and payload.
func v4(opts []byte, proto byte, frag uint16, payload []byte) []byte {
	hl := ipv4HeaderLen + len(opts)
	p := make([]byte, hl+len(payload))
	p[0] = 0x40 | byte(hl/4)
	binary.BigEndian.PutUint16(p[2:], uint16(len(p)))
	binary.BigEndian.PutUint16(p[4:], 0x1234) // identification
	binary.BigEndian.PutUint16(p[6:], frag)
	p[8], p[9] = 64, proto
	copy(p[12:16], []byte{100, 64, 7, 1})
	copy(p[16:20], []byte{100, 64, 3, 1})
	copy(p[ipv4HeaderLen:], opts)
	binary.BigEndian.PutUint16(p[10:], ^checksum.Sum(0, p[:hl]))
	copy(p[hl:], payload)
	return p
}

func v6(next byte, payload []byte) []byte {
	p := make([]byte, ipv6HeaderLen+len(payload))
	p[0] = 0x60
	binary.BigEndian.PutUint16(p[4:], uint16(len(payload)))
	p[6], p[7] = next, 64
	a, b := netip.MustParseAddr("fd00::7:1").As16(), netip.MustParseAddr("fd00::3:1").As16()
	copy(p[8:24], a[:])
	copy(p[24:40], b[:])
	copy(p[ipv6HeaderLen:], payload)
	return p
}

const (
	df = 0x4000
	mf = 0x2000
)

func TestTooBigAction(t *testing.T) {
	big := make([]byte, 2000)
	echo := append([]byte{8, 0}, big...)         // ICMP echo request
	unreachable := append([]byte{3, 1}, big...)  // ICMP error
	echo6 := append([]byte{128, 0}, big...)      // ICMPv6 echo request
	unreachable6 := append([]byte{1, 0}, big...) // ICMPv6 error
	for _, tc := range []struct {
		name string
		p    []byte
		want tooBigAction
	}{
		{"IPv4, DF clear", v4(nil, 17, 0, big), tooBigFragment},
		{"IPv4, DF set", v4(nil, 17, df, big), tooBigICMP},
		{"IPv4, DF set, ICMP echo", v4(nil, 1, df, echo), tooBigICMP},
		{"IPv4, DF set, ICMP error", v4(nil, 1, df, unreachable), tooBigDrop},
		{"IPv4, DF set, a later fragment", v4(nil, 17, df|10, big), tooBigDrop},
		{"IPv4, header length past the end", append([]byte{0x4f}, make([]byte, 30)...), tooBigDrop},
		{"IPv4, header length under 20", append([]byte{0x44}, make([]byte, 30)...), tooBigDrop},
		{"IPv6", v6(17, big), tooBigICMP},
		{"IPv6, ICMPv6 echo", v6(58, echo6), tooBigICMP},
		{"IPv6, ICMPv6 error", v6(58, unreachable6), tooBigDrop},
		{"IPv6, short", append([]byte{0x60}, make([]byte, 30)...), tooBigDrop},
		{"neither", append([]byte{0x50}, big...), tooBigDrop},
	} {
		if got := tooBig(tc.p); got != tc.want {
			t.Errorf("%s: %v, want %v", tc.name, got, tc.want)
		}
	}
}

// TestICMPTooBig: the errors decode (by gopacket, an independent decoder)
// as fragmentation-needed and packet-too-big with the MTU, to the
// packet's source, with correct checksums, quoting the packet's start up
// to the protocol's minimum MTU.
func TestICMPTooBig(t *testing.T) {
	out := make([]byte, icmpv6Max)
	p := v4(nil, 17, df, bytes.Repeat([]byte{0xab}, 2000))
	msg := icmpTooBig(out, p, netip.MustParseAddr("100.64.7.1"), 1400)
	if len(msg) != icmpv4Max {
		t.Fatalf("%d bytes, want %d", len(msg), icmpv4Max)
	}
	pkt := gopacket.NewPacket(msg, layers.LayerTypeIPv4, gopacket.Default)
	ip, _ := pkt.Layer(layers.LayerTypeIPv4).(*layers.IPv4)
	icmp, _ := pkt.Layer(layers.LayerTypeICMPv4).(*layers.ICMPv4)
	if ip == nil || icmp == nil {
		t.Fatalf("does not decode: %v", pkt.ErrorLayer())
	}
	if ip.DstIP.String() != "100.64.7.1" || ip.Protocol != layers.IPProtocolICMPv4 {
		t.Fatalf("IP header: %+v", ip)
	}
	if icmp.TypeCode != layers.CreateICMPv4TypeCode(3, 4) || icmp.Seq != 1400 {
		t.Fatalf("ICMP: %v, next-hop MTU %d", icmp.TypeCode, icmp.Seq)
	}
	if !bytes.Equal(icmp.Payload, p[:icmpv4Max-28]) {
		t.Fatal("the quoted packet differs")
	}
	if checksum.Sum(0, msg[:ipv4HeaderLen]) != 0xffff || checksum.Sum(0, msg[ipv4HeaderLen:]) != 0xffff {
		t.Fatal("checksums do not verify")
	}

	p6 := v6(17, bytes.Repeat([]byte{0xcd}, 2000))
	src := netip.MustParseAddr("fd00::7:1")
	msg = icmpTooBig(out, p6, src, 1400)
	if len(msg) != icmpv6Max {
		t.Fatalf("%d bytes, want %d", len(msg), icmpv6Max)
	}
	pkt = gopacket.NewPacket(msg, layers.LayerTypeIPv6, gopacket.Default)
	ip6, _ := pkt.Layer(layers.LayerTypeIPv6).(*layers.IPv6)
	icmp6, _ := pkt.Layer(layers.LayerTypeICMPv6).(*layers.ICMPv6)
	if ip6 == nil || icmp6 == nil {
		t.Fatalf("does not decode: %v", pkt.ErrorLayer())
	}
	if icmp6.TypeCode != layers.CreateICMPv6TypeCode(2, 0) || binary.BigEndian.Uint32(msg[44:48]) != 1400 {
		t.Fatalf("ICMPv6: %v", icmp6.TypeCode)
	}
	// gopacket computes the checksum over the same pseudo-header.
	check := *icmp6
	check.SetNetworkLayerForChecksum(ip6)
	buf := gopacket.NewSerializeBuffer()
	if err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{ComputeChecksums: true}, &check, gopacket.Payload(msg[44:])); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(buf.Bytes()[2:4], msg[ipv6HeaderLen+2:ipv6HeaderLen+4]) {
		t.Fatalf("checksum %x, gopacket computes %x", msg[42:44], buf.Bytes()[2:4])
	}
	if !bytes.Equal(msg[24:40], p6[8:24]) {
		t.Fatal("not sent to the packet's source")
	}
}

// TestFragment: property test: fragments of random packets (options with
// and without the copy flag, packets that are fragments themselves) fit
// the MTU, have valid header checksums and 8-byte offsets, carry only
// copied options after the first, and reassemble into the original.
func TestFragment(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	copied := []byte{0x83, 7, 4, 1, 2, 3, 4} // loose source route: copied
	notCopied := []byte{0x07, 3, 4}          // record route: not copied
	for i := 0; i < 500; i++ {
		var opts []byte
		if r.IntN(2) == 0 {
			opts = append(append(append(opts, notCopied...), 1), copied...) // with a no-op between
			for len(opts)%4 != 0 {
				opts = append(opts, 0)
			}
		}
		base, more := uint16(0), uint16(0)
		if r.IntN(3) == 0 { // itself a fragment
			base, more = uint16(r.IntN(100)), uint16(r.IntN(2))*mf
		}
		n := 1 + r.IntN(5000)
		if more != 0 {
			n = (n + 7) &^ 7 // a fragment with more to follow holds 8-byte units
		}
		payload := make([]byte, n)
		for j := range payload {
			payload[j] = byte(r.Uint32())
		}
		p := v4(opts, 17, base|more, payload)
		mtu := 68 + r.IntN(1500)
		got := make([]byte, len(payload))
		filled := 0
		ok := fragment(p, mtu, func(f []byte) {
			hl := int(f[0]&0x0f) * 4
			if len(f) > mtu || checksum.Sum(0, f[:hl]) != 0xffff || int(binary.BigEndian.Uint16(f[2:])) != len(f) {
				t.Fatalf("packet %d: a fragment of %d bytes (MTU %d), header %x", i, len(f), mtu, f[:hl])
			}
			fl := binary.BigEndian.Uint16(f[6:])
			off := int(fl&0x1fff)*8 - int(base)*8
			if off != filled && filled > 0 || off < 0 {
				t.Fatalf("packet %d: fragment at %d after %d bytes", i, off, filled)
			}
			if filled == 0 && !bytes.Equal(f[ipv4HeaderLen:hl], opts) {
				t.Fatalf("packet %d: the first fragment's options %x, want %x", i, f[ipv4HeaderLen:hl], opts)
			}
			if filled > 0 && len(opts) > 0 && !bytes.Equal(f[ipv4HeaderLen:ipv4HeaderLen+len(copied)], copied) {
				t.Fatalf("packet %d: later options %x", i, f[ipv4HeaderLen:hl])
			}
			if filled > 0 && hl > ipv4HeaderLen+len(copied)+3 {
				t.Fatalf("packet %d: options not to be copied were", i)
			}
			data := f[hl:]
			if fl&mf != 0 && len(data)%8 != 0 {
				t.Fatalf("packet %d: a non-last fragment of %d data bytes", i, len(data))
			}
			copy(got[off:], data)
			filled = off + len(data)
			if want := filled < len(payload) || more != 0; (fl&mf != 0) != want {
				t.Fatalf("packet %d: MF %v at %d of %d", i, fl&mf != 0, filled, len(payload))
			}
		})
		if !ok {
			t.Fatalf("packet %d: not fragmented at MTU %d", i, mtu)
		}
		if filled != len(payload) || !bytes.Equal(got, payload) {
			t.Fatalf("packet %d: reassembled %d of %d bytes, equal %v", i, filled, len(payload), bytes.Equal(got, payload))
		}
	}
}

func TestICMPLimiter(t *testing.T) {
	var l icmpLimiter
	now := time.Unix(1000, 0)
	n := 0
	for i := 0; i < 3*icmpPerSecond; i++ {
		if l.allow(now) {
			n++
		}
	}
	if n != icmpPerSecond {
		t.Fatalf("%d allowed in a second, want %d", n, icmpPerSecond)
	}
	if !l.allow(now.Add(time.Second)) {
		t.Fatal("none allowed in the next second")
	}
}

// FuzzOversize: any packet the stack hands over, at any MTU, is dropped,
// fragmented into pieces that fit, or answered, without a panic.
func FuzzOversize(f *testing.F) {
	f.Add(v4(nil, 17, 0, make([]byte, 100)), 68)
	f.Add(v4([]byte{0x83, 3, 0, 0}, 17, 0, make([]byte, 100)), 40)
	f.Add(v4(nil, 1, df, []byte{3, 4}), 576)
	f.Add(v6(58, []byte{128, 0}), 1280)
	f.Add([]byte{0x4f, 0, 0, 0}, 1)
	out := make([]byte, icmpv6Max)
	f.Fuzz(func(t *testing.T, p []byte, mtu int) {
		if len(p) == 0 || mtu < 68 || mtu > 65535 {
			return
		}
		switch tooBig(p) {
		case tooBigFragment:
			fragment(p, mtu, func(fr []byte) {
				if len(fr) > mtu {
					t.Fatalf("a fragment of %d bytes at MTU %d", len(fr), mtu)
				}
			})
		case tooBigICMP:
			src := netip.MustParseAddr("100.64.0.1")
			if p[0]>>4 == 6 {
				src = netip.MustParseAddr("fd00::1")
			}
			if m := icmpTooBig(out, p, src, mtu); len(m) > icmpv6Max {
				t.Fatalf("an error of %d bytes", len(m))
			}
		}
	})
}
