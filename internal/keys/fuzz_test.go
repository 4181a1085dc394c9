package keys

import (
	"errors"
	"strings"
	"testing"
)

// FuzzParseSPI: any text either parses to an SPI that prints back as the
// same 8 hex digits (lowercased) with a non-zero index, or is refused with
// ErrSyntax or ErrSPIIndexZero.
func FuzzParseSPI(f *testing.F) {
	for _, s := range []string{"80001234", "00000000", "80000000", "ffffffff", "8000123", "zzzzzzzz", "", "0x123456"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, text string) {
		s, err := ParseSPI(text)
		if err != nil {
			if !errors.Is(err, ErrSyntax) && !errors.Is(err, ErrSPIIndexZero) {
				t.Fatalf("ParseSPI(%q): untyped error %v", text, err)
			}
			return
		}
		if s.Index() == 0 || s.String() != strings.ToLower(text) {
			t.Fatalf("ParseSPI(%q) = %s", text, s)
		}
	})
}

// FuzzParseKey: a parsed key prints back as its input; errors are typed.
func FuzzParseKey(f *testing.F) {
	f.Add(vecOK)
	f.Add(vecOK + "\n")
	f.Add(vecOK[:63] + "x")
	f.Add("")
	f.Fuzz(func(t *testing.T, text string) {
		k, err := ParseKey(text)
		if err != nil {
			if !errors.Is(err, ErrSyntax) && !errors.Is(err, ErrKeyLength) {
				t.Fatalf("ParseKey: untyped error %v", err)
			}
			if k != (Key{}) {
				t.Fatal("a refused key left bytes behind")
			}
			return
		}
		if k.Hex() != strings.ToLower(strings.TrimSpace(text)) {
			t.Fatalf("ParseKey(%q) round trip failed", text)
		}
	})
}

// FuzzParseIDs: ids parse within their ranges or fail with typed errors.
func FuzzParseIDs(f *testing.F) {
	for _, s := range []string{"0", "1", "65535", "65536", "4294967295", "-1", " 7 ", "1e3", ""} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, text string) {
		if e, err := ParseEnclaveID(text); err == nil && e == 0 {
			t.Fatal("enclave 0 accepted")
		} else if err != nil && !errors.Is(err, ErrSyntax) && !errors.Is(err, ErrEnclaveZero) {
			t.Fatalf("ParseEnclaveID: untyped error %v", err)
		}
		if _, err := ParseServerID(text); err != nil && !errors.Is(err, ErrSyntax) {
			t.Fatalf("ParseServerID: untyped error %v", err)
		}
		if _, err := ParseGeneration(text); err != nil && !errors.Is(err, ErrSyntax) {
			t.Fatalf("ParseGeneration: untyped error %v", err)
		}
		if _, err := ParseVersion(text); err != nil && !errors.Is(err, ErrVersion) {
			t.Fatalf("ParseVersion: untyped error %v", err)
		}
	})
}

// FuzzDeriver: arbitrary derivation requests against a deriver at each
// level never panic, and every refusal is one of the documented errors.
func FuzzDeriver(f *testing.F) {
	f.Add(uint8(1), uint16(3), uint16(7), uint32(258), uint32(0x80001234), uint8(1))
	f.Add(uint8(2), uint16(0), uint16(7), uint32(0), uint32(0), uint8(2))
	f.Add(uint8(3), uint16(7), uint16(3), uint32(9), uint32(0x00000001), uint8(0))
	ok := mustKey(f, vecOK)
	derivers := []*Deriver{
		{},
		mustDeriver(f, ok[:], Scope{Level: LevelOrg, Generation: 1, HasGeneration: true}),
		mustDeriver(f, ok[:], Scope{Level: LevelPair, Enclave: 3, Peer: 7}),
		mustDeriver(f, ok[:], Scope{Level: LevelServer, Enclave: 3, Peer: 7, Server: 258}),
	}
	known := []error{ErrNoKey, ErrVersion, ErrSPIIndexZero, ErrParity, ErrEnclaveZero, ErrScope}
	f.Fuzz(func(t *testing.T, level uint8, i, j uint16, k, spi uint32, v uint8) {
		d := derivers[int(level)%len(derivers)]
		var out SAKey
		err := d.SAKey(&out, VC{EnclaveID(i), EnclaveID(j), ServerID(k)}, SPI(spi), Version(v))
		if err == nil {
			if len(out.Bytes()) != Version(v).KeySize() {
				t.Fatal("wrong key length")
			}
			return
		}
		for _, e := range known {
			if err == e {
				return
			}
		}
		t.Fatalf("unexpected error %v", err)
	})
}

func mustDeriver(t testing.TB, key []byte, s Scope) *Deriver {
	t.Helper()
	d, err := NewDeriver(key, s)
	if err != nil {
		t.Fatal(err)
	}
	return d
}
