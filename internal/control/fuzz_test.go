package control

import (
	"bytes"
	"net/netip"
	"testing"
	"time"
)

// seeds are valid messages of every kind, for every fuzz target.
func seeds(f *testing.F) {
	init, _, _ := AppendInitiation(nil, 1, bytes.Repeat([]byte{1}, 64))
	at, _ := PathOffset(init)
	init, _ = AppendEntry(init, at, &PathEntry{Flags: PathSelfReport, Enclave: 7, Pairs: []Pair{{3, 7}}})
	resp, _ := AppendResponse(nil, 2, 1, bytes.Repeat([]byte{2}, 96))
	cookie, _ := AppendCookieReply(nil, 1, [MACLen]byte{1})
	sealed, _ := AppendSealedFraming(nil, 1, 2, 3)
	sealed = append(sealed, make([]byte, 20)...)
	ip, _ := (&InitiatorPayload{Timestamp: time.Unix(1, 0), Cert: []byte("cert")}).Append(nil)
	rp, _ := (&ResponderPayload{Cert: []byte("cert"), Grant: testGrant()}).Append(nil)
	rr, _ := (&ResponderPayload{Cert: []byte("cert"), Refusal: RefusedPolicy, Reason: "no"}).Append(nil)
	rs, _ := (&ResponderPayload{Cert: []byte("cert"), Session: true}).Append(nil)
	relay := make([]byte, MaxRelayHeader)
	n, _ := PutRelayHeader(relay, netip.MustParseAddrPort("[2001:db8::1]:1001"))
	relay = relay[:n]
	inner, _ := AppendInner(nil, &Inner{Type: InnerRekeyNotice, Rekey: &RekeyNotice{Reason: 1, Deadline: time.Hour}})
	for _, s := range [][]byte{init, resp, cookie, sealed, ip, rp, rr, rs, relay, inner, {0}, nil} {
		f.Add(s)
	}
}

// The fuzz targets: any bytes are parsed or refused with an error, never
// a panic; what parses re-encodes to the same bytes where the format is
// canonical.

func FuzzHeader(f *testing.F) {
	seeds(f)
	f.Fuzz(func(t *testing.T, b []byte) { _, _ = ParseHeader(b) })
}

func FuzzInitiation(f *testing.F) {
	seeds(f)
	f.Fuzz(func(t *testing.T, b []byte) {
		in, err := ParseInitiation(b)
		if err != nil {
			return
		}
		if len(in.Authenticated)+MACLen+len(in.PathBytes) != len(b) {
			t.Fatal("the parts do not cover the message")
		}
	})
}

func FuzzResponse(f *testing.F) {
	seeds(f)
	f.Fuzz(func(t *testing.T, b []byte) { _, _ = ParseResponse(b) })
}

func FuzzCookieReply(f *testing.F) {
	seeds(f)
	f.Fuzz(func(t *testing.T, b []byte) {
		echo, cookie, err := ParseCookieReply(b)
		if err != nil {
			return
		}
		again, _ := AppendCookieReply(nil, echo, cookie)
		if !bytes.Equal(again, b) {
			t.Fatal("cookie reply does not re-encode")
		}
	})
}

func FuzzUnknownSA(f *testing.F) {
	seeds(f)
	f.Add([]byte{Magic, Version, byte(TypeUnknownSA), 0, 0x80, 0, 0x12, 0x34})
	f.Fuzz(func(t *testing.T, b []byte) {
		spi, err := ParseUnknownSA(b)
		if err != nil {
			return
		}
		again, _ := AppendUnknownSA(nil, spi)
		if !bytes.Equal(again, b) {
			t.Fatal("unknown-SA message does not re-encode")
		}
	})
}

func FuzzSealed(f *testing.F) {
	seeds(f)
	f.Fuzz(func(t *testing.T, b []byte) { _, _ = ParseSealed(b) })
}

func FuzzInitiatorPayload(f *testing.F) {
	seeds(f)
	f.Fuzz(func(t *testing.T, b []byte) {
		p, err := ParseInitiatorPayload(b)
		if err != nil {
			return
		}
		again, err := p.Append(nil)
		if err != nil || !bytes.Equal(again, b) {
			t.Fatalf("initiator payload does not re-encode: %v", err)
		}
	})
}

func FuzzResponderPayload(f *testing.F) {
	seeds(f)
	f.Fuzz(func(t *testing.T, b []byte) {
		p, err := ParseResponderPayload(b)
		if err != nil {
			return
		}
		again, err := p.Append(nil)
		if err != nil || !bytes.Equal(again, b) {
			t.Fatalf("responder payload does not re-encode: %v", err)
		}
	})
}

func FuzzPathRecord(f *testing.F) {
	seeds(f)
	f.Fuzz(func(t *testing.T, b []byte) {
		rec, err := ParsePathRecord(b)
		if err != nil {
			return
		}
		out := []byte{0}
		for i := range rec.Entries {
			if rec.Entries[i].Version == PathVersion1 {
				return // parsed, never written: entries are written in version 2
			}
			if rec.Entries[i].Version == PathVersionStub {
				out, err = appendRaw(out, 0, stubBytes(rec.Entries[i].Stub))
			} else {
				out, err = AppendEntry(out, 0, &rec.Entries[i])
			}
			if err != nil {
				t.Fatal(err)
			}
		}
		if !bytes.Equal(out, b) {
			t.Fatal("path record does not re-encode")
		}
	})
}

// FuzzEntryMessage: a TypeEntry message parses or is refused; one that
// parses resolves the stub naming it in a path record, and only that one.
func FuzzEntryMessage(f *testing.F) {
	seeds(f)
	e := PathEntry{Flags: PathSigned, Enclave: 7, Pairs: []Pair{{3, 7}}, Cert: []byte{0x30, 1, 2}}
	raw, _ := EntryBytes(nil, &e)
	msg, _ := AppendEntryMessage(nil, 9, raw)
	f.Add(msg)
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := ParseEntryMessage(b)
		if err != nil {
			return
		}
		rec, err := ParsePathRecord(stubBytesRecord(m.Hash))
		if err != nil {
			t.Fatal(err)
		}
		if err := rec.Resolve(0, m.Raw); err != nil || !rec.Entries[0].Detached {
			t.Fatalf("the entry does not resolve its own stub: %v", err)
		}
		other, _ := ParsePathRecord(stubBytesRecord([32]byte{1}))
		if other.Resolve(0, m.Raw) == nil {
			t.Fatal("the entry resolved another stub")
		}
	})
}

// stubBytesRecord is a path record holding one stub.
func stubBytesRecord(h [32]byte) []byte { return append([]byte{1}, stubBytes(h)...) }

func FuzzInner(f *testing.F) {
	seeds(f)
	f.Fuzz(func(t *testing.T, b []byte) {
		in, err := ParseInner(b)
		if err != nil {
			return
		}
		again, err := AppendInner(nil, &in)
		if err != nil || !bytes.Equal(again, b) {
			t.Fatalf("inner message does not re-encode: %v", err)
		}
	})
}

func FuzzRelayHeader(f *testing.F) {
	seeds(f)
	f.Fuzz(func(t *testing.T, b []byte) {
		a, n, err := ParseRelayHeader(b)
		if err != nil {
			return
		}
		again := make([]byte, MaxRelayHeader)
		m, err := PutRelayHeader(again, a)
		if err != nil || m != n || !bytes.Equal(again[:m], b[:n]) {
			t.Fatalf("relay header does not re-encode: %v", err)
		}
	})
}
