package control

import (
	"bytes"
	"crypto/ed25519"
	"encoding/hex"
	"errors"
	"net/netip"
	"strings"
	"testing"
	"time"
)

func unhex(t testing.TB, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(strings.ReplaceAll(s, " ", ""))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestExamples: the hex examples of docs/PROTOCOL.md, byte for byte.
func TestExamples(t *testing.T) {
	var cookie [MACLen]byte
	copy(cookie[:], unhex(t, "00112233445566778899aabbccddeeff"))
	got, err := AppendCookieReply(nil, 0x01020304, cookie)
	if err != nil || !bytes.Equal(got, unhex(t, "4501030001020304 00112233445566778899aabbccddeeff")) {
		t.Fatalf("cookie reply %x %v", got, err)
	}
	if got, err := AppendUnknownSA(nil, 0x80001234); err != nil || !bytes.Equal(got, unhex(t, "4501050080001234")) {
		t.Fatalf("unknown SA %x %v", got, err)
	}
	for _, bad := range []string{"4501050080000000", "450105000000000000", "4501050080001234ff", "4501040080001234"} {
		if _, err := ParseUnknownSA(unhex(t, bad)); err == nil {
			t.Errorf("unknown SA %s parsed", bad)
		}
	}
	rec, _ := AppendEntry([]byte{0}, 0, &PathEntry{Flags: PathSelfReport, Enclave: 7})
	if want := unhex(t, "01 0019 02 04 0007 00 00000000000000000000000000000000 0000 0000"); !bytes.Equal(rec, want) {
		t.Fatalf("self-report path record %x, want %x", rec, want)
	}
	// A version 1 entry (no destination) still parses: an old gateway's
	// handshakes pass, its entries are only not trusted (discovery).
	if old, err := ParsePathRecord(unhex(t, "01 0007 01 04 0007 00 0000")); err != nil || old.Entries[0].Version != PathVersion1 || old.Entries[0].To.IsValid() {
		t.Fatalf("version 1 entry: %+v %v", old, err)
	}
	if _, err := ParsePathRecord(unhex(t, "01 0007 04 04 0007 00 0000")); !errors.Is(err, ErrVersion) {
		t.Fatalf("version 4 entry: %v", err)
	}
	if _, err := ParsePathRecord(unhex(t, "01 0007 03 04 0007 00 0000")); !errors.Is(err, ErrReserved) {
		t.Fatalf("a version 3 stub with its reserved byte set: %v", err)
	}
	for _, to := range []string{"192.0.2.7:1001", "[2001:db8::7]:1001"} {
		dst := netip.MustParseAddrPort(to)
		rec, err := AppendEntry([]byte{0}, 0, &PathEntry{Enclave: 7, To: dst})
		if err != nil {
			t.Fatal(err)
		}
		got, err := ParsePathRecord(rec)
		if err != nil || got.Entries[0].To != dst || got.Entries[0].Version != PathVersion {
			t.Fatalf("destination %s came back as %+v (%v)", to, got, err)
		}
	}
	inner, _ := AppendInner(nil, &Inner{Type: InnerRekeyNotice, Rekey: &RekeyNotice{Reason: RekeyRotation, Deadline: time.Hour}})
	if want := unhex(t, "01 01 00000e10"); !bytes.Equal(inner, want) {
		t.Fatalf("rekey notice %x", inner)
	}
	ack, _ := AppendInner(nil, &Inner{Type: InnerKeyAck, Ack: 0x80001234})
	if want := unhex(t, "06 80001234"); !bytes.Equal(ack, want) {
		t.Fatalf("key ack %x", ack)
	}
	if in, err := ParseInner(ack); err != nil || in.Ack != 0x80001234 {
		t.Fatalf("key ack parsed: %+v %v", in, err)
	}
	for _, bad := range []string{"06 80000000", "06 800012", "06 8000123400"} {
		if _, err := ParseInner(unhex(t, bad)); err == nil {
			t.Errorf("key ack %s parsed", bad)
		}
	}
	hdr := make([]byte, MaxRelayHeader)
	n, err := PutRelayHeader(hdr, netip.MustParseAddrPort("192.0.2.7:1001"))
	if want := unhex(t, "52 01 04 00 c0000207 03e9"); err != nil || !bytes.Equal(hdr[:n], want) {
		t.Fatalf("relay header %x %v", hdr[:n], err)
	}
	session, _ := (&ResponderPayload{Cert: []byte{0x30}, Session: true}).Append(nil)
	if want := append(append(unhex(t, "01 00 0001 30"), make([]byte, SignatureLen)...), 0x80); !bytes.Equal(session, want) {
		t.Fatalf("session answer %x", session)
	}
}

// TestRelayHeader: both families round-trip; malformed headers are
// refused.
func TestRelayHeader(t *testing.T) {
	for _, s := range []string{"192.0.2.1:1000", "[2001:db8::1]:65535", "[::ffff:192.0.2.1]:7"} {
		a := netip.MustParseAddrPort(s)
		b := make([]byte, MaxRelayHeader+3)
		n, err := PutRelayHeader(b, a)
		if err != nil {
			t.Fatal(err)
		}
		got, m, err := ParseRelayHeader(b[:n+3])
		if err != nil || m != n || got != netip.AddrPortFrom(a.Addr().Unmap(), a.Port()) {
			t.Fatalf("%s: %v %d %v", s, got, m, err)
		}
	}
	for name, b := range map[string][]byte{
		"empty":       nil,
		"magic":       unhex(t, "53 01 04 00 c0000207 03e9"),
		"version":     unhex(t, "52 02 04 00 c0000207 03e9"),
		"family":      unhex(t, "52 01 05 00 c0000207 03e9"),
		"reserved":    unhex(t, "52 01 04 01 c0000207 03e9"),
		"short":       unhex(t, "52 01 04 00 c0000207 03"),
		"port 0":      unhex(t, "52 01 04 00 c0000207 0000"),
		"unspecified": unhex(t, "52 01 04 00 00000000 03e9"),
		"mapped v4":   unhex(t, "52 01 06 00 00000000000000000000ffffc0000207 03e9"),
	} {
		if _, _, err := ParseRelayHeader(b); !errors.Is(err, ErrRelay) {
			t.Errorf("%s: %v", name, err)
		}
	}
	if _, err := PutRelayHeader(make([]byte, 3), netip.MustParseAddrPort("192.0.2.1:1")); !errors.Is(err, ErrRelay) {
		t.Errorf("no room: %v", err)
	}
}

func TestHeader(t *testing.T) {
	good := unhex(t, "4501030001020304")
	tests := []struct {
		name string
		b    []byte
		want error
	}{
		{"short", good[:7], ErrShort},
		{"long", make([]byte, MaxMessage+1), ErrLong},
		{"magic", append([]byte{0x46}, good[1:]...), ErrMagic},
		{"version", append([]byte{0x45, 2}, good[2:]...), ErrVersion},
		{"type 0", append([]byte{0x45, 1, 0}, good[3:]...), ErrType},
		{"type 7", append([]byte{0x45, 1, 7}, good[3:]...), ErrType},
		{"reserved", append([]byte{0x45, 1, 3, 1}, good[4:]...), ErrReserved},
		{"index 0", unhex(t, "4501030000000000"), ErrIndex},
	}
	for _, tt := range tests {
		if _, err := ParseHeader(tt.b); !errors.Is(err, tt.want) {
			t.Errorf("%s: %v, want %v", tt.name, err, tt.want)
		}
	}
	if h, err := ParseHeader(good); err != nil || h.Type != TypeCookieReply || h.Sender != 0x01020304 {
		t.Fatalf("%+v %v", h, err)
	}
}

func TestInitiationRoundTrip(t *testing.T) {
	noise := bytes.Repeat([]byte{9}, 200)
	msg, macAt, err := AppendInitiation(nil, 77, noise)
	if err != nil {
		t.Fatal(err)
	}
	copy(msg[macAt:], bytes.Repeat([]byte{0xaa}, MACLen))
	in, err := ParseInitiation(msg)
	if err != nil || in.Sender != 77 || !bytes.Equal(in.Noise, noise) || in.MAC2[0] != 0xaa || len(in.Path.Entries) != 0 {
		t.Fatalf("%+v %v", in, err)
	}
	if len(in.Authenticated) != macAt {
		t.Fatalf("authenticated part %d bytes, mac2 at %d", len(in.Authenticated), macAt)
	}
	if off, err := PathOffset(msg); err != nil || off != macAt+MACLen {
		t.Fatalf("path offset %d %v", off, err)
	}
	// Truncations and a missing path record are refused.
	for n := 0; n < len(msg); n++ {
		if _, err := ParseInitiation(msg[:n]); err == nil {
			t.Fatalf("a %d-byte prefix parsed", n)
		}
	}
	if _, _, err := AppendInitiation(nil, 0, noise); !errors.Is(err, ErrIndex) {
		t.Fatal("index 0 encoded")
	}
}

func TestResponseRoundTrip(t *testing.T) {
	noise := bytes.Repeat([]byte{5}, 150)
	msg, err := AppendResponse(nil, 8, 9, noise)
	if err != nil {
		t.Fatal(err)
	}
	r, err := ParseResponse(msg)
	if err != nil || r.Sender != 8 || r.Receiver != 9 || !bytes.Equal(r.Noise, noise) {
		t.Fatalf("%+v %v", r, err)
	}
	if _, err := ParseResponse(append(msg, 1)); !errors.Is(err, ErrPath) {
		t.Fatalf("trailing byte: %v", err)
	}
	if _, err := ParseInitiation(msg); !errors.Is(err, ErrType) {
		t.Fatalf("response as initiation: %v", err)
	}
}

func testGrant() *Grant {
	return &Grant{PSPVersion: 1, Enclave: 3, Peer: 7, Server: 258, Generation: 1, SPIOut: 0x80001234, SPIIn: 0x80005678,
		Lifetime: time.Hour, KeyOut: bytes.Repeat([]byte{1}, 32), KeyIn: bytes.Repeat([]byte{2}, 32)}
}

func TestPayloads(t *testing.T) {
	ip := InitiatorPayload{Timestamp: time.Unix(1764000000, 5).UTC(), Cert: []byte("cert")}
	ip.Signature[0] = 7
	b, err := ip.Append(nil)
	if err != nil {
		t.Fatal(err)
	}
	got, err := ParseInitiatorPayload(b)
	if err != nil || !got.Timestamp.Equal(ip.Timestamp) || string(got.Cert) != "cert" || got.Signature != ip.Signature {
		t.Fatalf("%+v %v", got, err)
	}
	rp := ResponderPayload{Flags: FlagDirectKeyExchange, Cert: []byte("server cert"), Grant: testGrant()}
	b, err = rp.Append(nil)
	if err != nil {
		t.Fatal(err)
	}
	gotR, err := ParseResponderPayload(b)
	if err != nil || gotR.Grant == nil || gotR.Grant.SPIIn != 0x80005678 || !bytes.Equal(gotR.Grant.KeyIn, testGrant().KeyIn) || gotR.Grant.Lifetime != time.Hour {
		t.Fatalf("%+v %v", gotR, err)
	}
	refused := ResponderPayload{Cert: []byte("c"), Refusal: RefusedPolicy, Reason: "pair 3-9 is not allowed"}
	b, _ = refused.Append(nil)
	if gotR, err = ParseResponderPayload(b); err != nil || gotR.Refusal != RefusedPolicy || gotR.Reason != refused.Reason || gotR.Grant != nil {
		t.Fatalf("refusal %+v %v", gotR, err)
	}
	sess := ResponderPayload{Flags: FlagDirectKeyExchange, Cert: []byte("c"), Session: true}
	b, _ = sess.Append(nil)
	if gotR, err = ParseResponderPayload(b); err != nil || !gotR.Session || gotR.Grant != nil || gotR.Refusal != 0 {
		t.Fatalf("session %+v %v", gotR, err)
	}
	if _, err := ParseResponderPayload(append(b, 0)); !errors.Is(err, ErrPayload) {
		t.Errorf("session with trailing bytes: %v", err)
	}
	// Grants of the wrong shape are refused.
	bad := []func(g *Grant){
		func(g *Grant) { g.SPIOut = 0x00001234 }, // parity of another generation
		func(g *Grant) { g.SPIIn = 0x80000000 },  // index 0
		func(g *Grant) { g.SPIIn = g.SPIOut },    // the same SPI both ways
		func(g *Grant) { g.Peer = 0 },            // enclave 0
	}
	for i, mod := range bad {
		g := testGrant()
		mod(g)
		b, err := (&ResponderPayload{Cert: []byte("c"), Grant: g}).Append(nil)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := ParseResponderPayload(b); !errors.Is(err, ErrGrant) {
			t.Errorf("bad grant %d: %v", i, err)
		}
	}
	if _, err := (&ResponderPayload{Cert: []byte("c"), Grant: &Grant{PSPVersion: 2}}).Append(nil); !errors.Is(err, ErrPSP) {
		t.Errorf("PSP version 2: %v", err)
	}
	if _, err := (&InitiatorPayload{}).Append(nil); !errors.Is(err, ErrCert) {
		t.Errorf("no certificate: %v", err)
	}
}

// TestPathSignatures: entries appended one after another, each signed over
// the handshake and the entries before it, verify; changing an earlier
// entry or the handshake breaks the later signatures.
func TestPathSignatures(t *testing.T) {
	noise := []byte("noise message one")
	msg, _, _ := AppendInitiation(nil, 1, noise)
	at, _ := PathOffset(msg)
	keys := make([]ed25519.PrivateKey, 3)
	for i := range keys {
		_, keys[i], _ = ed25519.GenerateKey(nil)
		in, _ := ParseInitiation(msg)
		e := PathEntry{Flags: PathSigned, Enclave: uint16(10 + i), Pairs: []Pair{{3, 7}}, Cert: []byte{byte(i), 1, 2}}
		m, err := PathSignedBytes(in.Noise, in.Path.PriorBytes(len(in.Path.Entries)), &e)
		if err != nil {
			t.Fatal(err)
		}
		copy(e.Signature[:], ed25519.Sign(keys[i], m))
		if msg, err = AppendEntry(msg, at, &e); err != nil {
			t.Fatal(err)
		}
	}
	in, err := ParseInitiation(msg)
	if err != nil || len(in.Path.Entries) != 3 {
		t.Fatalf("%v %d", err, len(in.Path.Entries))
	}
	verify := func(in Initiation, noise []byte) []bool {
		var ok []bool
		for i := range in.Path.Entries {
			e := &in.Path.Entries[i]
			m, _ := PathSignedBytes(noise, in.Path.PriorBytes(i), e)
			ok = append(ok, ed25519.Verify(keys[i].Public().(ed25519.PublicKey), m, e.Signature[:]))
		}
		return ok
	}
	if ok := verify(in, in.Noise); !ok[0] || !ok[1] || !ok[2] {
		t.Fatalf("signatures %v", ok)
	}
	if ok := verify(in, []byte("another handshake")); ok[0] || ok[1] || ok[2] {
		t.Fatal("entries verified against another handshake")
	}
	// Changing entry 1's enclave breaks entries 1 and 2, not 0.
	tampered := bytes.Clone(msg)
	off := at + 1 + len(in.Path.Entries[0].Raw) + 2 + 2
	tampered[off+1]++
	in2, err := ParseInitiation(tampered)
	if err != nil {
		t.Fatal(err)
	}
	if ok := verify(in2, in2.Noise); !ok[0] || ok[1] || ok[2] {
		t.Fatalf("after tampering with entry 1: %v", ok)
	}
}

// TestDetachedEntry: an entry that travels apart (a TypeEntry message)
// leaves a stub of StubLen bytes in the path record; the stub parses, and
// resolves to the entry (keeping its own bytes, which later entries sign)
// only with the entry's exact bytes.
func TestDetachedEntry(t *testing.T) {
	e := PathEntry{Flags: PathSigned | PathNeedKey, Enclave: 7, Pairs: []Pair{{3, 7}}, To: netip.MustParseAddrPort("10.98.2.2:1001"), Cert: []byte{0x30, 3, 1, 2, 3}}
	e.Signature[0] = 0x55
	raw, err := EntryBytes(nil, &e)
	if err != nil {
		t.Fatal(err)
	}
	msg, err := AppendEntryMessage(nil, 0x01020304, raw)
	if err != nil {
		t.Fatal(err)
	}
	m, err := ParseEntryMessage(msg)
	if err != nil || m.Sender != 0x01020304 || !bytes.Equal(m.Raw, raw) {
		t.Fatalf("%+v %v", m, err)
	}
	rec0 := []byte{0}
	withStub, err := AppendStub(rec0, 0, raw)
	if err != nil || len(withStub) != 1+StubLen {
		t.Fatalf("%d bytes, %v", len(withStub), err)
	}
	later := PathEntry{Flags: 0, Enclave: 3}
	withStub, _ = AppendEntry(withStub, 0, &later)
	rec, err := ParsePathRecord(withStub)
	if err != nil || len(rec.Entries) != 2 || rec.Entries[0].Version != PathVersionStub || rec.Entries[0].Stub != m.Hash {
		t.Fatalf("%+v %v", rec, err)
	}
	prior := rec.PriorBytes(1)
	bad := append([]byte(nil), raw...)
	bad[len(bad)-1] ^= 1
	if err := rec.Resolve(0, bad); err == nil {
		t.Fatal("a changed entry resolved the stub")
	}
	if err := rec.Resolve(1, raw); err == nil {
		t.Fatal("an entry resolved what is no stub")
	}
	if err := rec.Resolve(0, raw); err != nil {
		t.Fatal(err)
	}
	got := rec.Entries[0]
	if !got.Detached || got.Enclave != 7 || got.Flags != e.Flags || got.To != e.To || !bytes.Equal(got.Cert, e.Cert) || got.Signature != e.Signature {
		t.Fatalf("resolved to %+v", got)
	}
	if !bytes.Equal(rec.PriorBytes(1), prior) {
		t.Fatal("resolving changed what the later entry signed")
	}
	stubMsg, _ := AppendEntryMessage(nil, 9, withStub[1:1+StubLen])
	if _, err := ParseEntryMessage(stubMsg); err == nil {
		t.Fatal("a stub travelled as an entry")
	}
}

func TestPathLimits(t *testing.T) {
	msg := []byte{0}
	var err error
	for i := 0; i < MaxPathEntries; i++ {
		if msg, err = AppendEntry(msg, 0, &PathEntry{Enclave: 1}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := AppendEntry(msg, 0, &PathEntry{Enclave: 1}); !errors.Is(err, ErrTooMany) {
		t.Fatalf("entry 9: %v", err)
	}
	over := bytes.Clone(msg)
	over[0] = MaxPathEntries + 1
	if _, err := ParsePathRecord(over); !errors.Is(err, ErrTooMany) {
		t.Fatalf("count 9: %v", err)
	}
	if _, err := AppendEntry([]byte{0}, 0, &PathEntry{Pairs: make([]Pair, MaxPathPairs+1)}); err == nil {
		t.Fatal("17 pairs encoded")
	}
	if _, err := AppendEntry([]byte{0}, 0, &PathEntry{Flags: PathSigned}); !errors.Is(err, ErrCert) {
		t.Fatalf("signed without a certificate: %v", err)
	}
	// A signed flag with no certificate, or a certificate on an unsigned
	// entry, does not parse.
	if _, err := ParsePathRecord(unhex(t, "01 0007 01 01 0007 00 0000")); !errors.Is(err, ErrPath) {
		t.Fatalf("signed, no cert: %v", err)
	}
	if _, err := ParsePathRecord(unhex(t, "01 0008 01 00 0007 00 0001 aa")); !errors.Is(err, ErrPath) {
		t.Fatalf("unsigned with cert: %v", err)
	}
	if _, err := ParsePathRecord(unhex(t, "01 0007 01 80 0007 00 0000")); !errors.Is(err, ErrPath) {
		t.Fatalf("unknown flag: %v", err)
	}
}

func TestSealedAndInner(t *testing.T) {
	f, err := AppendSealedFraming(nil, 1, 2, 99)
	if err != nil {
		t.Fatal(err)
	}
	msg := append(f, bytes.Repeat([]byte{3}, 20)...)
	s, err := ParseSealed(msg)
	if err != nil || s.Sender != 1 || s.Receiver != 2 || s.Counter != 99 || len(s.Ciphertext) != 20 || !bytes.Equal(s.AD, f) {
		t.Fatalf("%+v %v", s, err)
	}
	if _, err := ParseSealed(msg[:SealedOverhead+15]); !errors.Is(err, ErrShort) {
		t.Fatalf("no room for a tag: %v", err)
	}
	inners := []Inner{
		{Type: InnerRekeyNotice, Rekey: &RekeyNotice{Reason: RekeyRevocation, Deadline: 5 * time.Second}},
		{Type: InnerRekeyRequest, Request: &RekeyRequest{SPI: 0x80000001, IV: 77, ICV: [16]byte{1, 2}}},
		{Type: InnerKeyDelivery, Keys: testGrant()},
		{Type: InnerClose, Close: 2},
		{Type: InnerRefused, Refusal: RefusedRevoked, Reason: "gw is revoked"},
	}
	for _, in := range inners {
		b, err := AppendInner(nil, &in)
		if err != nil {
			t.Fatal(err)
		}
		got, err := ParseInner(b)
		if err != nil || got.Type != in.Type {
			t.Fatalf("%v: %+v %v", in.Type, got, err)
		}
		again, _ := AppendInner(nil, &got)
		if !bytes.Equal(again, b) {
			t.Fatalf("%v: re-encoding differs", in.Type)
		}
		if _, err := ParseInner(append(b, 0)); !errors.Is(err, ErrInner) {
			t.Fatalf("%v with a trailing byte: %v", in.Type, err)
		}
	}
	if _, err := ParseInner([]byte{9}); !errors.Is(err, ErrInner) {
		t.Fatal("inner type 9 parsed")
	}
}
