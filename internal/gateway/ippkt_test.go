package gateway

import (
	"bytes"
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"testing"

	"github.com/google/gopacket"
	"github.com/google/gopacket/layers"
)

// udpIP builds an IP packet carrying a UDP datagram with correct checksums
// (gopacket's), IPv4 or IPv6.
func udpIP(t testing.TB, v6 bool, payload []byte) []byte {
	t.Helper()
	udp := &layers.UDP{SrcPort: 1000, DstPort: 1001}
	var ip gopacket.NetworkLayer
	var ipl gopacket.SerializableLayer
	if v6 {
		l := &layers.IPv6{Version: 6, HopLimit: 64, NextHeader: layers.IPProtocolUDP, SrcIP: net.ParseIP("2001:db8::1"), DstIP: net.ParseIP("2001:db8::2")}
		ip, ipl = l, l
	} else {
		l := &layers.IPv4{Version: 4, TTL: 64, Protocol: layers.IPProtocolUDP, SrcIP: net.IPv4(10, 98, 1, 2), DstIP: net.IPv4(10, 98, 2, 2)}
		ip, ipl = l, l
	}
	udp.SetNetworkLayerForChecksum(ip)
	buf := gopacket.NewSerializeBuffer()
	if err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true}, ipl, udp, gopacket.Payload(payload)); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// TestRebuildUDP: a datagram whose payload grows (a tagged handshake)
// comes out with the lengths and checksums gopacket computes for the same
// packet built from scratch; an IPv4 datagram without a UDP checksum
// keeps none.
func TestRebuildUDP(t *testing.T) {
	for _, v6 := range []bool{false, true} {
		orig := udpIP(t, v6, []byte("handshake"))
		var u udpPacket
		if err := parseUDP(&u, orig); err != nil {
			t.Fatal(err)
		}
		if string(u.payload) != "handshake" || u.src.Port() != 1000 || u.dst.Port() != 1001 || u.v6 != v6 {
			t.Fatalf("parsed %+v", u)
		}
		grown := []byte("handshake plus a path entry, odd length")
		got, err := rebuildUDP(nil, orig, &u, grown)
		if err != nil {
			t.Fatal(err)
		}
		if want := udpIP(t, v6, grown); !bytes.Equal(got, want) {
			t.Fatalf("v6=%v:\n got %x\nwant %x", v6, got, want)
		}
	}
	orig := udpIP(t, false, []byte("x"))
	binary.BigEndian.PutUint16(orig[26:], 0) // sent without a checksum
	var u udpPacket
	parseUDP(&u, orig)
	got, _ := rebuildUDP(nil, orig, &u, []byte("xyz"))
	if binary.BigEndian.Uint16(got[26:]) != 0 || binary.BigEndian.Uint16(got[2:]) != 31 {
		t.Fatalf("%x", got)
	}
}

func TestParseUDPRefusals(t *testing.T) {
	good := udpIP(t, false, []byte("abc"))
	frag := bytes.Clone(good)
	binary.BigEndian.PutUint16(frag[6:], 0x2000) // more fragments
	tcp := bytes.Clone(good)
	tcp[9] = 6
	short := bytes.Clone(good)
	binary.BigEndian.PutUint16(short[2:], 100) // total length past the end
	var u udpPacket
	for name, c := range map[string]struct {
		pkt  []byte
		want error
	}{
		"fragment": {frag, errFragment}, "tcp": {tcp, errNotUDP}, "length": {short, errIPHeader},
		"empty": {nil, errIPHeader}, "version 5": {[]byte{0x50}, errIPHeader},
	} {
		if err := parseUDP(&u, c.pkt); !errors.Is(err, c.want) {
			t.Errorf("%s: %v", name, err)
		}
	}
}

func TestInnerTuple(t *testing.T) {
	var tu tuple
	if !innerTuple(&tu, udpIP(t, true, []byte("q"))) || tu.proto != protoUDP || tu.srcPort != 1000 || tu.dstPort != 1001 || tu.dst != netip.MustParseAddr("2001:db8::2") {
		t.Fatalf("%+v", tu)
	}
	frag := udpIP(t, false, []byte("q"))
	binary.BigEndian.PutUint16(frag[6:], 100) // a later fragment: no ports
	if !innerTuple(&tu, frag) || tu.srcPort != 0 || tu.dstPort != 0 {
		t.Fatalf("later fragment %+v", tu)
	}
	if innerTuple(&tu, []byte{0x45, 0}) {
		t.Fatal("a short packet gave a tuple")
	}
}

// FuzzIPPackets: any bytes parse as an outer UDP packet or inner tuple, or
// are refused, never a panic; a datagram that parses can be rebuilt with
// a new payload and parses again to it.
func FuzzIPPackets(f *testing.F) {
	f.Add(udpIP(f, false, []byte("handshake")))
	f.Add(udpIP(f, true, []byte("handshake")))
	f.Add([]byte{0x46, 0, 0, 24})
	f.Fuzz(func(t *testing.T, b []byte) {
		var tu tuple
		innerTuple(&tu, b)
		var u udpPacket
		if parseUDP(&u, b) != nil {
			return
		}
		out, err := rebuildUDP(nil, b, &u, append(bytes.Clone(u.payload), "+entry"...))
		if err != nil {
			return
		}
		var again udpPacket
		if err := parseUDP(&again, out); err != nil || !bytes.HasSuffix(again.payload, []byte("+entry")) {
			t.Fatalf("rebuilt packet: %v", err)
		}
	})
}

// TestParseUDPFragmentsAndHeaders: the first fragment of a UDP datagram
// and UDP behind IPv6 extension headers give their ports (the inline
// gateway drops them when they are its ports'), later fragments are told
// apart (nothing without their first).
func TestParseUDPFragmentsAndHeaders(t *testing.T) {
	udp := []byte{0x12, 0x34, 0x03, 0xe8, 0, 16, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8} // to port 1000
	v4 := func(frag uint16) []byte {
		p := make([]byte, 20)
		p[0], p[9] = 0x45, protoUDP
		binary.BigEndian.PutUint16(p[2:], uint16(20+len(udp)))
		binary.BigEndian.PutUint16(p[6:], frag)
		copy(p[12:], []byte{10, 0, 0, 1})
		copy(p[16:], []byte{10, 0, 0, 2})
		return append(p, udp...)
	}
	v6 := func(nh byte, ext []byte) []byte {
		p := make([]byte, 40)
		p[0], p[6] = 0x60, nh
		binary.BigEndian.PutUint16(p[4:], uint16(len(ext)+len(udp)))
		return append(append(p, ext...), udp...)
	}
	for _, c := range []struct {
		name string
		pkt  []byte
		want error
		port uint16
	}{
		{"v4 first fragment", v4(0x2000), errFragment, 1000},
		{"v4 later fragment", v4(0x0010), errLaterFragment, 0},
		{"v6 destination options", v6(60, []byte{17, 0, 1, 4, 0, 0, 0, 0}), errExtHeader, 1000},
		{"v6 first fragment", v6(44, []byte{17, 0, 0, 1, 0, 0, 0, 9}), errExtHeader, 1000},
		{"v6 later fragment", v6(44, []byte{17, 0, 0, 0x80, 0, 0, 0, 9}), errLaterFragment, 0},
	} {
		var u udpPacket
		err := parseUDP(&u, c.pkt)
		if err != c.want || (c.port != 0 && u.dst.Port() != c.port) {
			t.Errorf("%s: %v, port %d; want %v, %d", c.name, err, u.dst.Port(), c.want, c.port)
		}
	}
}
