package packet

import (
	"bytes"
	"fmt"
	"testing"

	"github.com/enclavekeys/enclave/internal/keys"
)

// pspPayloads are payloads of each mode: an inner IPv4 and IPv6 packet
// (tunnel mode) and a UDP and TCP segment (transport mode).
func pspPayloads() []struct {
	name string
	next uint8
	data []byte
} {
	ipv4 := append([]byte{0x45, 0, 0, 48, 0, 1, 0x40, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2}, make([]byte, 28)...)
	ipv6 := append([]byte{0x60, 0, 0, 0, 0, 16, 17, 64}, make([]byte, 32+16)...)
	udp := append([]byte{0x30, 0x39, 0x00, 0x35, 0, 28, 0, 0}, []byte("enclave transport data")...)
	tcp := append([]byte{0x30, 0x39, 0x01, 0xbb, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0}, []byte("GET / HTTP/1.1\r\n")...)
	return []struct {
		name string
		next uint8
		data []byte
	}{{"tunnel-v4", NextIPv4, ipv4}, {"tunnel-v6", NextIPv6, ipv6}, {"transport-udp", 17, udp}, {"transport-tcp", 6, tcp}}
}

// TestPSPMatrix (issue 35): every form of PSP packet (tunnel and
// transport mode, versions 0 and 1, with and without a VC of any value,
// crypt offsets from 0, which encrypts the VC, to past the first bytes of
// the payload) seals and opens back to its payload, in place and into
// another buffer; a flipped bit anywhere is refused; only the Enclave
// form (tunnel, the VC in the clear naming two enclaves) passes Parse.
func TestPSPMatrix(t *testing.T) {
	n := 0
	for _, pl := range pspPayloads() {
		for _, v := range []keys.Version{keys.PSPv0, keys.PSPv1} {
			key := bytes.Repeat([]byte{byte(v) + 7}, v.KeySize())
			g, err := NewAEAD(v, key)
			if err != nil {
				t.Fatal(err)
			}
			for _, vc := range []*keys.VC{nil, {}, {Enclave: 3, Peer: 7, Server: 258}} {
				for _, off := range []uint8{0, 1, 2, 3, 6, 11} {
					name := fmt.Sprintf("%s/v%d/vc=%v/off=%d", pl.name, v, vc, off)
					h := Header{NextHeader: pl.next, Version: v, SPI: 0x9a345678, IV: 5}
					f := PSPForm{NoVC: vc == nil, CryptOffset: off}
					if vc != nil {
						h.VC = *vc
					}
					hdr := HeaderLen
					if vc == nil {
						hdr = PSPHeaderLen
					}
					pkt, err := SealPSP(make([]byte, HeaderLen+len(pl.data)+TagLen), &h, f, g, pl.data)
					if PSPHeaderLen+4*int(off) > hdr+len(pl.data) {
						if err != ErrCryptOffset {
							t.Fatalf("%s: a crypt offset past the payload: %v", name, err)
						}
						continue
					}
					if err != nil {
						t.Fatalf("%s: seal: %v", name, err)
					}
					var p Parsed
					if err := ParsePSP(&p, pkt); err != nil {
						t.Fatalf("%s: parse: %v", name, err)
					}
					if p.HasVC != (vc != nil) || p.Tunnel() != (pl.next == NextIPv4 || pl.next == NextIPv6) || p.CryptOffset != off {
						t.Fatalf("%s: parsed %+v", name, p.Header)
					}
					if p.VCClear != (vc != nil && off >= 2) || (p.VCClear && p.VC != *vc) {
						t.Fatalf("%s: VC clear %v: %v", name, p.VCClear, p.VC)
					}
					got, err := Open(nil, &p, g)
					if err != nil || !bytes.Equal(got, pl.data) {
						t.Fatalf("%s: open into a new buffer: %v\n%x\n%x", name, err, got, pl.data)
					}
					again := bytes.Clone(pkt)
					var q Parsed
					ParsePSP(&q, again)
					got, err = Open(q.Sealed[:0], &q, g)
					if err != nil || !bytes.Equal(got, pl.data) {
						t.Fatalf("%s: open in place: %v\n%x\n%x", name, err, got, pl.data)
					}
					// Enclave's own form only: tunnel, VC in the clear, two enclaves.
					enclave := p.Tunnel() && vc != nil && off == 2 && vc.Enclave != 0
					if err := Parse(&q, pkt); (err == nil) != enclave {
						t.Fatalf("%s: Parse: %v", name, err)
					}
					for i := 0; i < len(pkt); i += 3 {
						bad := bytes.Clone(pkt)
						bad[i] ^= 0x04
						var b Parsed
						if ParsePSP(&b, bad) != nil {
							continue // malformed now: refused before the tag
						}
						if _, err := Open(nil, &b, g); err != ErrAuth && err != ErrKeyLength {
							t.Fatalf("%s: bit flipped in byte %d opened: %v", name, i, err)
						}
					}
					n++
				}
			}
		}
	}
	t.Logf("%d forms sealed, opened and tampered with", n)
}

// TestSealPSPRefuses: a crypt offset past the payload, and SealPSP's
// other bad inputs, are errors.
func TestSealPSPRefuses(t *testing.T) {
	g, _ := NewAEAD(keys.PSPv1, make([]byte, 32))
	h := Header{NextHeader: 17, Version: keys.PSPv1, SPI: 1, IV: 1}
	for _, c := range []struct {
		name string
		f    PSPForm
		h    Header
		want error
	}{
		{"crypt offset past the payload", PSPForm{NoVC: true, CryptOffset: 5}, h, ErrCryptOffset},
		{"crypt offset over 63", PSPForm{CryptOffset: 64}, h, ErrCryptOffset},
		{"IV 0", PSPForm{}, Header{NextHeader: 17, Version: keys.PSPv1, SPI: 1}, ErrIVZero},
		{"SPI index 0", PSPForm{}, Header{NextHeader: 17, Version: keys.PSPv1, SPI: 0x80000000, IV: 1}, ErrSPIIndexZero},
	} {
		if _, err := SealPSP(make([]byte, 100), &c.h, c.f, g, make([]byte, 8)); err != c.want {
			t.Errorf("%s: %v, want %v", c.name, err, c.want)
		}
	}
}

// FuzzParsePSP: any bytes parse as PSP or are refused with a known
// error; a parsed packet's parts cover it exactly and lie where its
// header says.
func FuzzParsePSP(f *testing.F) {
	g, _ := NewAEAD(keys.PSPv0, make([]byte, 16))
	seal, _ := NewAEAD(keys.PSPv0, bytes.Repeat([]byte{1}, 16))
	for _, pl := range pspPayloads() {
		for _, form := range []PSPForm{{NoVC: true}, {CryptOffset: 0}, {CryptOffset: 1}, {CryptOffset: 6}} {
			h := Header{NextHeader: pl.next, Version: keys.PSPv0, SPI: 0x12345678, IV: 1}
			pkt, err := SealPSP(make([]byte, HeaderLen+len(pl.data)+TagLen), &h, form, seal, pl.data)
			if err == nil {
				f.Add(pkt)
			}
		}
	}
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, pkt []byte) {
		var p Parsed
		if err := ParsePSP(&p, pkt); err != nil {
			if CauseOf(err) == CauseOther {
				t.Fatalf("untyped parse error %v", err)
			}
			return
		}
		if len(p.AAD)+len(p.Sealed) != len(pkt) || len(p.Sealed) < TagLen || len(p.AAD) != PSPHeaderLen+4*int(p.CryptOffset) {
			t.Fatalf("parts %d+%d for %d bytes, crypt offset %d", len(p.AAD), len(p.Sealed), len(pkt), p.CryptOffset)
		}
		if p.HdrLen < PSPHeaderLen || p.HdrLen > len(pkt)-TagLen || (p.HasVC && p.HdrLen < HeaderLen) || (p.VCClear && !p.HasVC) {
			t.Fatalf("header %d bytes, VC %v clear %v, in %d", p.HdrLen, p.HasVC, p.VCClear, len(pkt))
		}
		// It opens to nothing under a wrong key, and never panics.
		if _, err := Open(nil, &p, g); err == nil {
			t.Fatalf("a fuzzed packet opened under a zero key")
		}
	})
}

// FuzzPSPRoundTrip: any payload in any form seals and opens back to it.
func FuzzPSPRoundTrip(f *testing.F) {
	f.Add([]byte("payload"), uint8(2), false, uint8(4), true)
	f.Add([]byte{}, uint8(0), true, uint8(17), false)
	f.Fuzz(func(t *testing.T, payload []byte, off uint8, noVC bool, next uint8, v1 bool) {
		v := keys.PSPv0
		if v1 {
			v = keys.PSPv1
		}
		g, _ := NewAEAD(v, bytes.Repeat([]byte{9}, v.KeySize()))
		h := Header{NextHeader: next, Version: v, SPI: 0x80000001, IV: 3, VC: keys.VC{Enclave: 1, Peer: 2, Server: 3}}
		pkt, err := SealPSP(make([]byte, HeaderLen+len(payload)+TagLen), &h, PSPForm{NoVC: noVC, CryptOffset: off}, g, payload)
		if err != nil {
			if err != ErrCryptOffset && err != ErrTooLong {
				t.Fatalf("seal: %v", err)
			}
			return
		}
		var p Parsed
		if err := ParsePSP(&p, pkt); err != nil {
			t.Fatalf("parse of a sealed packet: %v", err)
		}
		got, err := Open(p.Sealed[:0], &p, g)
		if err != nil || !bytes.Equal(got, payload) {
			t.Fatalf("open: %v: %x, want %x", err, got, payload)
		}
	})
}

// TestOpenRefusesBadBuffers: Open checks its buffers before it writes: a
// dst that starts at the sealed part but lacks room (opened into a fresh
// buffer), a Parsed whose parts are not one packet, a dst overlapping the
// header are refused or opened right, never wrong, and the packet is left
// as it was.
func TestOpenRefusesBadBuffers(t *testing.T) {
	g, _ := NewAEAD(keys.PSPv1, make([]byte, 32))
	h := Header{NextHeader: NextIPv4, Version: keys.PSPv1, SPI: 0x80000001, IV: 1, VC: keys.VC{Enclave: 3, Peer: 7, Server: 1}}
	payload := bytes.Repeat([]byte{0x45}, 40)
	good, err := SealPSP(make([]byte, HeaderLen+len(payload)+TagLen), &h, PSPForm{CryptOffset: 4}, g, payload)
	if err != nil {
		t.Fatal(err)
	}
	try := func(name string, f func(pkt []byte, p *Parsed) []byte) {
		pkt := bytes.Clone(good)
		var p Parsed
		if err := ParsePSP(&p, pkt); err != nil {
			t.Fatal(err)
		}
		// Refused, or opened right (into a fresh buffer): never wrong.
		if got, err := Open(f(pkt, &p), &p, g); err != ErrBuffer && (err != nil || !bytes.Equal(got, payload)) {
			t.Errorf("%s: %x %v, want ErrBuffer or the payload", name, got, err)
		}
		if !bytes.Equal(pkt, good) {
			t.Errorf("%s: the packet was written to", name)
		}
	}
	try("in place without room", func(_ []byte, p *Parsed) []byte { return p.Sealed[:0:4] })
	try("parts of two buffers", func(_ []byte, p *Parsed) []byte {
		p.AAD = bytes.Clone(p.AAD)
		return p.Sealed[:0]
	})
	try("dst over the header", func(pkt []byte, _ *Parsed) []byte { return pkt[:0] })
}

// TestParseOnlyEnclaveForm: agents, gateways and NICs read Enclave's form
// only (DESIGN §4: hdr ext len 2, crypt offset 2), so that every reader,
// of any release, takes the same bytes as the inner packet.
func TestParseOnlyEnclaveForm(t *testing.T) {
	g, _ := NewAEAD(keys.PSPv1, make([]byte, 32))
	h := Header{NextHeader: NextIPv4, Version: keys.PSPv1, SPI: 0x80000001, IV: 1, VC: keys.VC{Enclave: 3, Peer: 7, Server: 1}}
	payload := bytes.Repeat([]byte{0x45}, 40)
	wider, _ := SealPSP(make([]byte, HeaderLen+len(payload)+TagLen), &h, PSPForm{CryptOffset: 3}, g, payload)
	var p Parsed
	if err := Parse(&p, wider); err != ErrCryptOffset {
		t.Errorf("crypt offset 3: %v", err)
	}
	longer := bytes.Clone(wider)
	longer[1], longer[2] = 3, 2 // an extension word more
	if err := Parse(&p, longer); err != ErrHdrExtLen {
		t.Errorf("hdr ext len 3: %v", err)
	}
}
