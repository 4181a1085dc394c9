package keys

import (
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"strings"
	"testing"
	"testing/quick"
)

// TestPairSymmetry is the law EK(i,j,g) = EK(j,i,g), over random keys,
// pairs and generations.
func TestPairSymmetry(t *testing.T) {
	law := func(root Key, i, j uint16, g uint32) bool {
		if i == 0 || j == 0 {
			return true
		}
		a, err1 := PairKey(&root, EnclaveID(i), EnclaveID(j), Generation(g))
		b, err2 := PairKey(&root, EnclaveID(j), EnclaveID(i), Generation(g))
		return err1 == nil && err2 == nil && a.Equal(&b)
	}
	if err := quick.Check(law, &quick.Config{MaxCount: 2000}); err != nil {
		t.Fatal(err)
	}
}

// TestDistinctInputsDistinctKeys: SK(i,j,k) and SK(j,i,k) differ (the server's
// own enclave comes first), as do keys of other servers and generations.
func TestDistinctInputsDistinctKeys(t *testing.T) {
	ok := mustKey(t, vecOK)
	seen := map[Key]string{}
	add := func(k Key, what string) {
		if prev, dup := seen[k]; dup {
			t.Fatalf("%s and %s derive the same key", what, prev)
		}
		seen[k] = what
	}
	for g := Generation(0); g < 3; g++ {
		for i := EnclaveID(1); i < 5; i++ {
			for j := i; j < 5; j++ {
				ek, err := PairKey(&ok, i, j, g)
				if err != nil {
					t.Fatal(err)
				}
				add(ek, fmt.Sprintf("EK(%d,%d,%d)", i, j, g))
				vcs := []VC{{i, j, 1}, {i, j, 2}}
				if i != j {
					vcs = append(vcs, VC{j, i, 1}) // the other direction differs
				}
				for _, vc := range vcs {
					sk, err := ServerKey(&ek, vc)
					if err != nil {
						t.Fatal(err)
					}
					add(sk, fmt.Sprintf("SK%v g%d", vc, g))
				}
			}
		}
	}
}

// TestLevelsAgree: from random keys, the one-call Deriver at each level
// gives the same SA key as walking the levels one by one.
func TestLevelsAgree(t *testing.T) {
	r := rand.New(rand.NewPCG(7, 8))
	for n := 0; n < 300; n++ {
		var ok Key
		for i := range ok {
			ok[i] = byte(r.Uint32())
		}
		g := Generation(r.Uint32())
		vc := VC{EnclaveID(1 + r.IntN(65535)), EnclaveID(1 + r.IntN(65535)), ServerID(r.Uint32())}
		spi, err := NewSPI(g, 1+r.Uint32N(MaxSPIIndex))
		if err != nil {
			t.Fatal(err)
		}
		v := Version(r.IntN(2))
		ek, _ := PairKey(&ok, vc.Enclave, vc.Peer, g)
		sk, _ := ServerKey(&ek, vc)
		want, err := SAKeyFromServer(&sk, spi, v)
		if err != nil {
			t.Fatal(err)
		}
		for _, c := range []struct {
			key *Key
			s   Scope
		}{
			{&ok, Scope{Level: LevelOrg, Generation: g, HasGeneration: true}},
			{&ek, Scope{Level: LevelPair, Enclave: vc.Peer, Peer: vc.Enclave, Generation: g, HasGeneration: true}},
			{&sk, Scope{Level: LevelServer, Enclave: vc.Enclave, Peer: vc.Peer, Server: vc.Server}},
		} {
			d, err := NewDeriver(c.key[:], c.s)
			if err != nil {
				t.Fatal(err)
			}
			var got SAKey
			if err := d.SAKey(&got, vc, spi, v); err != nil {
				t.Fatalf("level %v: %v", c.s.Level, err)
			}
			if !got.Equal(&want) {
				t.Fatalf("level %v disagrees with the step-by-step derivation", c.s.Level)
			}
		}
		dOrg, _ := NewDeriver(ok[:], Scope{Level: LevelOrg, Generation: g, HasGeneration: true})
		var ek2, sk2 Key
		if err := dOrg.PairKey(&ek2, vc.Peer, vc.Enclave); err != nil || !ek2.Equal(&ek) {
			t.Fatalf("Deriver.PairKey: %v", err)
		}
		if err := dOrg.ServerKey(&sk2, vc); err != nil || !sk2.Equal(&sk) {
			t.Fatalf("Deriver.ServerKey: %v", err)
		}
	}
}

func TestDeriverRefusals(t *testing.T) {
	ok, ek, sk := mustKey(t, vecOK), mustKey(t, vecEK371), mustKey(t, vecSK37258)
	org, _ := NewDeriver(ok[:], Scope{Level: LevelOrg, Generation: 1, HasGeneration: true})
	pair, _ := NewDeriver(ek[:], Scope{Level: LevelPair, Enclave: 3, Peer: 7, Generation: 1, HasGeneration: true})
	server, _ := NewDeriver(sk[:], Scope{Level: LevelServer, Enclave: 3, Peer: 7, Server: 258})
	good := VC{3, 7, 258}
	tests := []struct {
		name string
		d    *Deriver
		vc   VC
		spi  SPI
		v    Version
		want error
	}{
		{"zero deriver", &Deriver{}, good, 0x80001234, PSPv1, ErrNoKey},
		{"version 2", org, good, 0x80001234, 2, ErrVersion},
		{"spi index 0", org, good, 0x80000000, PSPv1, ErrSPIIndexZero},
		{"spi 0", server, good, 0, PSPv1, ErrSPIIndexZero},
		{"even spi, odd generation (org)", org, good, 0x00001234, PSPv1, ErrParity},
		{"even spi, odd generation (pair)", pair, good, 0x00001234, PSPv1, ErrParity},
		{"enclave 0 (org)", org, VC{0, 7, 1}, 0x80001234, PSPv1, ErrEnclaveZero},
		{"peer 0 (pair)", pair, VC{3, 0, 1}, 0x80001234, PSPv1, ErrEnclaveZero},
		{"other pair", pair, VC{3, 8, 258}, 0x80001234, PSPv1, ErrScope},
		{"other server", server, VC{3, 7, 259}, 0x80001234, PSPv1, ErrScope},
		{"reversed server vc", server, VC{7, 3, 258}, 0x80001234, PSPv1, ErrScope},
	}
	for _, tt := range tests {
		var out SAKey
		out.b[0] = 0xaa
		err := tt.d.SAKey(&out, tt.vc, tt.spi, tt.v)
		if !errors.Is(err, tt.want) {
			t.Errorf("%s: %v, want %v", tt.name, err, tt.want)
		}
		if out != (SAKey{}) {
			t.Errorf("%s: a refused derivation left key bytes in out", tt.name)
		}
	}
	var k Key
	if err := server.PairKey(&k, 3, 7); !errors.Is(err, ErrLevel) {
		t.Errorf("PairKey from a server key: %v, want ErrLevel", err)
	}
	if err := server.ServerKey(&k, good); !errors.Is(err, ErrLevel) {
		t.Errorf("ServerKey from a server key: %v, want ErrLevel", err)
	}
	if err := pair.ServerKey(&k, VC{3, 9, 1}); !errors.Is(err, ErrScope) {
		t.Errorf("ServerKey outside the pair: %v, want ErrScope", err)
	}
	if err := org.PairKey(&k, 0, 7); !errors.Is(err, ErrEnclaveZero) {
		t.Errorf("PairKey(0,7): %v, want ErrEnclaveZero", err)
	}
}

func TestInitRefusals(t *testing.T) {
	key := make([]byte, 32)
	tests := []struct {
		name string
		key  []byte
		s    Scope
		want error
	}{
		{"short key", key[:31], Scope{Level: LevelServer}, ErrKeyLength},
		{"long key", append(key, 0), Scope{Level: LevelServer}, ErrKeyLength},
		{"org without generation", key, Scope{Level: LevelOrg}, ErrNoGeneration},
		{"pair without enclaves", key, Scope{Level: LevelPair, Enclave: 3}, ErrEnclaveZero},
		{"server with one enclave", key, Scope{Level: LevelServer, Peer: 3}, ErrEnclaveZero},
		{"SA level", key, Scope{Level: LevelSA}, ErrLevel},
		{"no level", key, Scope{}, ErrLevel},
	}
	for _, tt := range tests {
		if _, err := NewDeriver(tt.key, tt.s); !errors.Is(err, tt.want) {
			t.Errorf("%s: %v, want %v", tt.name, err, tt.want)
		}
	}
	var root Key
	if _, err := PairKey(&root, 0, 1, 0); !errors.Is(err, ErrEnclaveZero) {
		t.Errorf("PairKey(0,1): %v", err)
	}
	if _, err := ServerKey(&root, VC{1, 0, 0}); !errors.Is(err, ErrEnclaveZero) {
		t.Errorf("ServerKey(1,0): %v", err)
	}
	if _, err := SAKeyFromServer(&root, 0x80000000, PSPv1); !errors.Is(err, ErrSPIIndexZero) {
		t.Errorf("SAKey index 0: %v", err)
	}
	if _, err := SAKeyFromServer(&root, 1, 7); !errors.Is(err, ErrVersion) {
		t.Errorf("SAKey version 7: %v", err)
	}
}

// TestSAKeyReuse: an SAKey reused for a shorter key keeps no old bytes, and
// keys compare equal however the value was used before.
func TestSAKeyReuse(t *testing.T) {
	sk := mustKey(t, vecSK37258)
	d, _ := NewDeriver(sk[:], Scope{Level: LevelServer})
	var reused, fresh SAKey
	if err := d.SAKey(&reused, VC{}, 0x80001234, PSPv1); err != nil {
		t.Fatal(err)
	}
	if err := d.SAKey(&reused, VC{}, 0x80001234, PSPv0); err != nil {
		t.Fatal(err)
	}
	if err := d.SAKey(&fresh, VC{}, 0x80001234, PSPv0); err != nil {
		t.Fatal(err)
	}
	if !reused.Equal(&fresh) || reused != fresh || reused.Hex() != vecCKv0 {
		t.Fatal("a reused SAKey differs from a fresh one")
	}
}

// TestNoAllocs: the SA key from a prepared server key (the per-packet
// derivation of a server or NIC) allocates nothing, and neither does a
// refusal at any level. Walking down from a pair or org key prepares the
// intermediate keys with crypto/aes, whose key schedules live on the heap.
func TestNoAllocs(t *testing.T) {
	ok := mustKey(t, vecOK)
	sk := mustKey(t, vecSK37258)
	org, _ := NewDeriver(ok[:], Scope{Level: LevelOrg, Generation: 1, HasGeneration: true})
	server, _ := NewDeriver(sk[:], Scope{Level: LevelServer, Enclave: 3, Peer: 7, Server: 258})
	var out SAKey
	vc := VC{3, 7, 258}
	for _, v := range []Version{PSPv0, PSPv1} {
		if n := testing.AllocsPerRun(100, func() { _ = server.SAKey(&out, vc, 0x80001234, v) }); n != 0 {
			t.Errorf("SAKey (version %d) from the server level allocates %v times", v, n)
		}
	}
	if n := testing.AllocsPerRun(100, func() { _ = org.SAKey(&out, vc, 0x00001234, PSPv1) }); n != 0 {
		t.Errorf("a refused SAKey allocates %v times", n)
	}
	var k Key
	if n := testing.AllocsPerRun(100, func() { _ = org.PairKey(&k, 3, 7) }); n != 0 {
		t.Errorf("PairKey from a prepared org key allocates %v times", n)
	}
}

func TestSPI(t *testing.T) {
	s, err := ParseSPI("80001234")
	if err != nil || s != 0x80001234 || s.Parity() != 1 || s.Index() != 0x1234 || s.String() != "80001234" {
		t.Fatalf("ParseSPI(80001234) = %v, %v", s, err)
	}
	if s, err := NewSPI(4, 0x1234); err != nil || s != 0x00001234 {
		t.Errorf("NewSPI(4, 0x1234) = %v, %v", s, err)
	}
	if s, err := NewSPI(5, MaxSPIIndex); err != nil || s != 0xffffffff {
		t.Errorf("NewSPI(5, max) = %v, %v", s, err)
	}
	if _, err := NewSPI(1, 0); !errors.Is(err, ErrSPIIndexZero) {
		t.Errorf("NewSPI index 0: %v", err)
	}
	if _, err := NewSPI(1, 1<<31); !errors.Is(err, ErrSyntax) {
		t.Errorf("NewSPI index 2^31: %v", err)
	}
	for _, bad := range []string{"", "8000123", "800012345", "8000123g", "0x001234", " 8000123"} {
		if _, err := ParseSPI(bad); !errors.Is(err, ErrSyntax) {
			t.Errorf("ParseSPI(%q) = %v, want ErrSyntax", bad, err)
		}
	}
	for _, zero := range []string{"00000000", "80000000"} {
		if _, err := ParseSPI(zero); !errors.Is(err, ErrSPIIndexZero) {
			t.Errorf("ParseSPI(%q) = %v, want ErrSPIIndexZero", zero, err)
		}
	}
}

func TestParseIDs(t *testing.T) {
	if e, err := ParseEnclaveID("65535"); err != nil || e != 65535 {
		t.Errorf("ParseEnclaveID(65535) = %v, %v", e, err)
	}
	if _, err := ParseEnclaveID("0"); !errors.Is(err, ErrEnclaveZero) {
		t.Errorf("ParseEnclaveID(0): %v", err)
	}
	for _, bad := range []string{"", "-1", "65536", "x", "1.5", "0x10"} {
		if _, err := ParseEnclaveID(bad); !errors.Is(err, ErrSyntax) {
			t.Errorf("ParseEnclaveID(%q) = %v, want ErrSyntax", bad, err)
		}
	}
	if k, err := ParseServerID("4294967295"); err != nil || k != 1<<32-1 {
		t.Errorf("ParseServerID(max) = %v, %v", k, err)
	}
	if _, err := ParseServerID("4294967296"); !errors.Is(err, ErrSyntax) {
		t.Errorf("ParseServerID(2^32): %v", err)
	}
	if _, err := ParseGeneration("-2"); !errors.Is(err, ErrSyntax) {
		t.Errorf("ParseGeneration(-2): %v", err)
	}
	if v, err := ParseVersion("0"); err != nil || v != PSPv0 {
		t.Errorf("ParseVersion(0) = %v, %v", v, err)
	}
	if _, err := ParseVersion("2"); !errors.Is(err, ErrVersion) {
		t.Errorf("ParseVersion(2): %v", err)
	}
}

func TestParseKey(t *testing.T) {
	k, err := ParseKey(strings.ToUpper(vecOK) + "\n")
	if err != nil || k.Hex() != vecOK {
		t.Fatalf("ParseKey(upper + newline): %v", err)
	}
	for _, bad := range []string{"", vecOK[:62], vecOK + "00", vecOK[:63] + "g"} {
		_, err := ParseKey(bad)
		if !errors.Is(err, ErrKeyLength) && !errors.Is(err, ErrSyntax) {
			t.Errorf("ParseKey(%q) = %v", bad, err)
		}
	}
	if _, err := KeyFromBytes(make([]byte, 16)); !errors.Is(err, ErrKeyLength) {
		t.Errorf("KeyFromBytes(16 bytes): %v", err)
	}
}

// TestRedaction: key bytes never reach fmt, slog or JSON implicitly.
func TestRedaction(t *testing.T) {
	k := mustKey(t, vecOK)
	ck, _ := SAKeyFromServer(&k, 0x80001234, PSPv1)
	secrets := []string{vecOK, ck.Hex()}
	var sb strings.Builder
	for _, verb := range []string{"%v", "%+v", "%#v", "%s", "%x", "%X", "%q", "%d"} {
		fmt.Fprintf(&sb, verb+" "+verb+"\n", k, ck)
		fmt.Fprintf(&sb, verb+" "+verb+"\n", &k, &ck)
	}
	fmt.Fprintln(&sb, k, ck, []Key{k}, struct{ K Key }{k})
	h := slog.New(slog.NewJSONHandler(&sb, nil))
	h.Info("x", "k", k, "ck", ck)
	for _, s := range secrets {
		if strings.Contains(strings.ToLower(sb.String()), s[:16]) {
			t.Fatalf("key bytes leaked:\n%s", sb.String())
		}
	}
	if _, err := json.Marshal(k); !errors.Is(err, ErrSecret) {
		t.Errorf("json.Marshal(Key) = %v, want ErrSecret", err)
	}
	if _, err := json.Marshal(struct{ C SAKey }{ck}); !errors.Is(err, ErrSecret) {
		t.Errorf("json.Marshal(SAKey) = %v, want ErrSecret", err)
	}
}

func TestVCString(t *testing.T) {
	if got := (VC{Enclave: 3, Peer: 7, Server: 4294967295}).String(); got != "3,7,4294967295" {
		t.Fatalf("%q", got)
	}
}
