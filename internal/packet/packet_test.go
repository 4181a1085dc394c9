package packet

import (
	"bytes"
	"encoding/hex"
	"errors"
	"testing"

	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/testvec"
)

// The DESIGN §4 example: CK = the "Pv1" key of DESIGN §3, spi 80001234,
// iv 1, VC (3,7,258).
const (
	designCK     = "9bd253cc0a1a23bb1960342d4073736a70e5ac3eb0bb0ba7924bac4dea4c800e"
	designInner  = "4500001c000040004011b7c40a0300010a070002656e636c61766521"
	designPacket = "0402020780001234000000000000000100030007000001027e3d8bedcd5dae07920af074" +
		"3aa7fdf44207563f23cbc95a76fdc540bee02324eb8c74a06665075d08f5338c"
)

var designHeader = Header{NextHeader: NextIPv4, Version: keys.PSPv1, SPI: 0x80001234, IV: 1, VC: keys.VC{Enclave: 3, Peer: 7, Server: 258}}

// gcm prepares a hex key for the PSP version its length belongs to.
func gcm(t testing.TB, key string) *AEAD {
	t.Helper()
	k := testvec.Hex(t, key)
	v := keys.PSPv1
	if len(k) == 16 {
		v = keys.PSPv0
	}
	a, err := NewAEAD(v, k)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func TestDesignExample(t *testing.T) {
	key := gcm(t, designCK)
	inner := testvec.Hex(t, designInner)
	out := make([]byte, 100)
	pkt, err := Seal(out, &designHeader, key, inner)
	if err != nil {
		t.Fatal(err)
	}
	if got := hex.EncodeToString(pkt); got != designPacket {
		t.Fatalf("sealed\n%s\nwant\n%s", got, designPacket)
	}
	// In place: the inner packet already at out[HeaderLen:].
	buf := make([]byte, Overhead+len(inner))
	copy(buf[HeaderLen:], inner)
	pkt2, err := Seal(buf, &designHeader, key, buf[HeaderLen:HeaderLen+len(inner)])
	if err != nil || hex.EncodeToString(pkt2) != designPacket {
		t.Fatalf("in-place seal: %x, %v", pkt2, err)
	}
	var p Parsed
	if err := Parse(&p, pkt2); err != nil {
		t.Fatal(err)
	}
	if p.Header != (Header{NextHeader: 4, CryptOffset: 2, Version: keys.PSPv1, SPI: 0x80001234, IV: 1, VC: keys.VC{Enclave: 3, Peer: 7, Server: 258}}) {
		t.Fatalf("parsed header %+v", p.Header)
	}
	if len(p.AAD) != HeaderLen || &p.AAD[0] != &pkt2[0] || &p.Sealed[0] != &pkt2[HeaderLen] {
		t.Fatal("Parse copied or mis-sliced the packet")
	}
	got, err := Open(p.Sealed[:0], &p, key)
	if err != nil || !bytes.Equal(got, inner) {
		t.Fatalf("Open: %x, %v", got, err)
	}
}

func TestRoundTripVersionsAndSizes(t *testing.T) {
	keys128 := gcm(t, "000102030405060708090a0b0c0d0e0f")
	keys256 := gcm(t, designCK)
	for _, v := range []keys.Version{keys.PSPv0, keys.PSPv1} {
		key := map[keys.Version]*AEAD{keys.PSPv0: keys128, keys.PSPv1: keys256}[v]
		for _, nh := range []uint8{NextIPv4, NextIPv6} {
			for _, n := range []int{0, 1, 15, 16, 17, 64, 1400, 9000} {
				inner := bytes.Repeat([]byte{byte(n)}, n)
				h := Header{NextHeader: nh, Version: v, SPI: 0x00abcdef, IV: uint64(n) + 1, VC: keys.VC{Enclave: 1, Peer: 2, Server: 3}}
				pkt, err := Seal(make([]byte, Overhead+n), &h, key, inner)
				if err != nil {
					t.Fatal(err)
				}
				var p Parsed
				if err := Parse(&p, pkt); err != nil {
					t.Fatal(err)
				}
				got, err := Open(nil, &p, key)
				if err != nil || !bytes.Equal(got, inner) || p.Version != v || p.NextHeader != nh {
					t.Fatalf("v%d nh %d n %d: %v", v, nh, n, err)
				}
			}
		}
	}
}

// TestParseErrors: each malformation gets its own error, and so its own
// drop cause.
func TestParseErrors(t *testing.T) {
	good := testvec.Hex(t, designPacket)
	mod := func(f func(b []byte) []byte) []byte { return f(bytes.Clone(good)) }
	tests := []struct {
		name string
		pkt  []byte
		want error
	}{
		{"empty", nil, ErrShort},
		{"header only", good[:HeaderLen], ErrShort},
		{"one byte short", good[:HeaderLen+TagLen-1], ErrShort},
		{"hdr ext len 1 with the V bit", mod(func(b []byte) []byte { b[1] = 1; return b }), ErrHdrExtLen},
		{"hdr ext len 0", mod(func(b []byte) []byte { b[1] = 0; return b }), ErrHdrExtLen},
		{"hdr ext len past the packet", mod(func(b []byte) []byte { b[1] = 200; return b }), ErrShort},
		{"V bit clear (no VC)", mod(func(b []byte) []byte { b[3] &^= vBit; return b }), ErrNoVC},
		{"fixed bit clear", mod(func(b []byte) []byte { b[3] &^= fixedBit; return b }), ErrFixedBit},
		{"version 2 (GMAC)", mod(func(b []byte) []byte { b[3] = 2<<2 | vBit | fixedBit; return b }), ErrGMAC},
		{"version 3 (GMAC)", mod(func(b []byte) []byte { b[3] = 3<<2 | vBit | fixedBit; return b }), ErrGMAC},
		{"version 15", mod(func(b []byte) []byte { b[3] = 15<<2 | vBit | fixedBit; return b }), ErrVersion},
		{"spi index 0", mod(func(b []byte) []byte { copy(b[4:8], []byte{0x80, 0, 0, 0}); return b }), ErrSPIIndexZero},
		{"crypt offset 1 (half the VC encrypted)", mod(func(b []byte) []byte { b[2] = 1; return b }), ErrNoVC},
		{"crypt offset 0 (the VC encrypted)", mod(func(b []byte) []byte { b[2] = 0; return b }), ErrNoVC},
		{"crypt offset past tag", mod(func(b []byte) []byte { b[2] = 63; return b }), ErrCryptOffset},
		{"next header 17 (transport mode)", mod(func(b []byte) []byte { b[0] = 17; return b }), ErrNextHeader},
		{"iv 0", mod(func(b []byte) []byte { clear(b[8:16]); return b }), ErrIVZero},
		{"vc enclave 0", mod(func(b []byte) []byte { clear(b[16:18]); return b }), ErrEnclaveZero},
		{"vc peer 0", mod(func(b []byte) []byte { clear(b[18:20]); return b }), ErrEnclaveZero},
	}
	for _, tt := range tests {
		var p Parsed
		err := Parse(&p, tt.pkt)
		if err != tt.want {
			t.Errorf("%s: %v, want %v", tt.name, err, tt.want)
		}
		if p.AAD != nil || p.Sealed != nil {
			t.Errorf("%s: a refused packet left slices in Parsed", tt.name)
		}
		if CauseOf(err) == CauseOther {
			t.Errorf("%s: error has no drop cause of its own", tt.name)
		}
	}
	// Reserved R bits and S/D flags are accepted: they are authenticated.
	var p Parsed
	withFlags := mod(func(b []byte) []byte { b[2] |= 0xc0; b[3] |= sBit | dBit; return b })
	if err := Parse(&p, withFlags); err != nil || !p.Sample || !p.Drop || p.CryptOffset != 2 {
		t.Fatalf("flags: %v %+v", err, p.Header)
	}
	if _, err := Open(nil, &p, gcm(t, designCK)); err != ErrAuth {
		t.Fatalf("changed flags must fail authentication: %v", err)
	}
}

// TestEveryBitFlip: every single-bit change to an authenticated byte of a
// sealed packet is refused: by the parser, or by the tag.
func TestEveryBitFlip(t *testing.T) {
	key := gcm(t, designCK)
	good := testvec.Hex(t, designPacket)
	for i := 0; i < len(good)*8; i++ {
		bad := bytes.Clone(good)
		bad[i/8] ^= 1 << (i % 8)
		var p Parsed
		if err := Parse(&p, bad); err != nil {
			continue // refused as malformed
		}
		// Mostly ErrAuth; a flip of the version bit is ErrKeyLength.
		if inner, err := Open(nil, &p, key); err == nil {
			t.Fatalf("bit %d (byte %d) flipped: Open = %x, %v", i, i/8, inner, err)
		}
	}
}

func TestSealErrors(t *testing.T) {
	key := gcm(t, designCK)
	inner := make([]byte, 28)
	h := designHeader
	buf := make([]byte, 100)
	cases := []struct {
		name string
		mod  func(h *Header)
		out  []byte
		in   []byte
		key  *AEAD
		want error
	}{
		{"small buffer", nil, buf[:Overhead+27], inner, key, ErrBuffer},
		{"iv 0", func(h *Header) { h.IV = 0 }, buf, inner, key, ErrIVZero},
		{"v0 with 256-bit key", func(h *Header) { h.Version = keys.PSPv0 }, buf, inner, key, ErrKeyLength},
		{"version 3", func(h *Header) { h.Version = 3 }, buf, inner, key, ErrKeyLength},
		{"next header 6", func(h *Header) { h.NextHeader = 6 }, buf, inner, key, ErrNextHeader},
		{"spi 0", func(h *Header) { h.SPI = 0 }, buf, inner, key, ErrSPIIndexZero},
		{"vc enclave 0", func(h *Header) { h.VC.Enclave = 0 }, buf, inner, key, ErrEnclaveZero},
		{"inner over header", nil, buf, buf[10:38], key, ErrBuffer},
		{"inner shifted", nil, buf, buf[HeaderLen+1 : HeaderLen+29], key, ErrBuffer},
		{"keyless", nil, buf, inner, &AEAD{}, ErrKeyLength},
		{"too long", nil, make([]byte, MaxInner+Overhead+1), make([]byte, MaxInner+1), key, ErrTooLong},
	}
	for _, c := range cases {
		hh := h
		if c.mod != nil {
			c.mod(&hh)
		}
		if _, err := Seal(c.out, &hh, c.key, c.in); !errors.Is(err, c.want) {
			t.Errorf("%s: %v, want %v", c.name, err, c.want)
		}
	}
}

func TestStats(t *testing.T) {
	var s Stats
	s.Passed(100)
	s.Drop(CauseAuth)
	s.Drop(CauseAuth)
	s.Drop(Cause(99))
	snap := s.Snapshot()
	if snap.Packets != 1 || snap.Bytes != 100 || snap.Drops["auth"] != 2 || snap.Drops["other"] != 1 || len(snap.Drops) != 2 {
		t.Fatalf("snapshot %+v", snap)
	}
	if s.Dropped(CauseAuth) != 2 || s.Dropped(Cause(-1)) != 0 {
		t.Fatal("Dropped")
	}
}

func TestNoAllocs(t *testing.T) {
	key := gcm(t, designCK)
	buf := make([]byte, 1500)
	inner := buf[HeaderLen : HeaderLen+1400]
	var p Parsed
	n := testing.AllocsPerRun(50, func() {
		pkt, _ := Seal(buf, &designHeader, key, inner)
		_ = Parse(&p, pkt)
		_, _ = Open(p.Sealed[:0], &p, key)
	})
	if n != 0 {
		t.Fatalf("Seal+Parse+Open allocate %v times", n)
	}
}

// FuzzParse: any bytes parse or are refused with a known error; a parsed
// packet's slices cover it exactly, and re-encoding its header reproduces
// the first bytes when the sender's layout was used.
func FuzzParse(f *testing.F) {
	f.Add(testvec.Hex(f, designPacket))
	f.Add([]byte{})
	f.Add(make([]byte, 40))
	f.Fuzz(func(t *testing.T, pkt []byte) {
		var p Parsed
		err := Parse(&p, pkt)
		if err != nil {
			if CauseOf(err) == CauseOther {
				t.Fatalf("untyped parse error %v", err)
			}
			return
		}
		if len(p.AAD)+len(p.Sealed) != len(pkt) || len(p.Sealed) < TagLen || len(p.AAD) < HeaderLen {
			t.Fatalf("slices %d+%d for %d bytes", len(p.AAD), len(p.Sealed), len(pkt))
		}
		var again [HeaderLen]byte
		if err := p.Header.Put(again[:]); err != nil {
			t.Fatalf("a parsed header does not re-encode: %v", err)
		}
		if p.CryptOffset == 2 && pkt[2]&0xc0 == 0 && !bytes.Equal(again[:], pkt[:HeaderLen]) {
			t.Fatalf("re-encoded header %x, packet %x", again, pkt[:HeaderLen])
		}
	})
}

// FuzzOpen: no input opens under the DESIGN key unless it is the DESIGN
// packet itself.
func FuzzOpen(f *testing.F) {
	good := testvec.Hex(f, designPacket)
	f.Add(good)
	f.Add(good[:40])
	key := gcm(f, designCK)
	f.Fuzz(func(t *testing.T, pkt []byte) {
		var p Parsed
		if Parse(&p, pkt) != nil {
			return
		}
		// Every byte is authenticated (the R bits too), so only the DESIGN
		// packet itself opens.
		if inner, err := Open(nil, &p, key); err == nil && !bytes.Equal(pkt, good) {
			t.Fatalf("forged packet opened: %x -> %x", pkt, inner)
		}
	})
}
