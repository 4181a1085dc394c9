package keys

import (
	"encoding/hex"
	"testing"
)

// The normative reference vectors of DESIGN §3.
const (
	vecOK      = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
	vecEK371   = "fb96994d8420bbb6e8afbf09c1d2bf15e7fc77f478aa0ea457e0acb4454a3529"
	vecSK37258 = "9192dff597d48617d695adafb93333ba50ba77e90d81e36d9723defbef70a9ae"
	vecSK739   = "d966471c85d910115a88f34bf8f9d2e2831ad8ec426c52ddda023d96fcc0112f"
	vecCKv1    = "9bd253cc0a1a23bb1960342d4073736a70e5ac3eb0bb0ba7924bac4dea4c800e"
	vecCKv0    = "482374798d527e3fbc40b6026486b8d5"
)

func mustKey(t testing.TB, s string) Key {
	t.Helper()
	k, err := ParseKey(s)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func TestDesignVectors(t *testing.T) {
	ok := mustKey(t, vecOK)
	for _, pair := range [][2]EnclaveID{{3, 7}, {7, 3}} {
		ek, err := PairKey(&ok, pair[0], pair[1], 1)
		if err != nil {
			t.Fatal(err)
		}
		if got := ek.Hex(); got != vecEK371 {
			t.Errorf("EK(%d,%d,1) = %s, want %s", pair[0], pair[1], got, vecEK371)
		}
	}
	ek := mustKey(t, vecEK371)
	for _, tt := range []struct {
		vc   VC
		want string
	}{
		{VC{3, 7, 258}, vecSK37258},
		{VC{7, 3, 9}, vecSK739},
	} {
		sk, err := ServerKey(&ek, tt.vc)
		if err != nil {
			t.Fatal(err)
		}
		if got := sk.Hex(); got != tt.want {
			t.Errorf("SK%v = %s, want %s", tt.vc, got, tt.want)
		}
	}
	sk := mustKey(t, vecSK37258)
	for _, tt := range []struct {
		v    Version
		want string
	}{{PSPv1, vecCKv1}, {PSPv0, vecCKv0}} {
		ck, err := SAKeyFromServer(&sk, 0x80001234, tt.v)
		if err != nil {
			t.Fatal(err)
		}
		if got := ck.Hex(); got != tt.want {
			t.Errorf("CK v%d = %s, want %s", tt.v, got, tt.want)
		}
	}
}

// TestDesignVectorsFromEveryLevel derives the DESIGN SA keys in one call
// from the org key, the pair key and the server key.
func TestDesignVectorsFromEveryLevel(t *testing.T) {
	vc := VC{3, 7, 258}
	ok, ek, sk := mustKey(t, vecOK), mustKey(t, vecEK371), mustKey(t, vecSK37258)
	scopes := []struct {
		key   *Key
		scope Scope
	}{
		{&ok, Scope{Level: LevelOrg, Generation: 1, HasGeneration: true}},
		{&ek, Scope{Level: LevelPair, Enclave: 7, Peer: 3, Generation: 1, HasGeneration: true}},
		{&ek, Scope{Level: LevelPair, Enclave: 3, Peer: 7}},
		{&sk, Scope{Level: LevelServer, Enclave: 3, Peer: 7, Server: 258, Generation: 1, HasGeneration: true}},
		{&sk, Scope{Level: LevelServer}},
	}
	for _, s := range scopes {
		d, err := NewDeriver(s.key[:], s.scope)
		if err != nil {
			t.Fatal(err)
		}
		for v, want := range map[Version]string{PSPv1: vecCKv1, PSPv0: vecCKv0} {
			var ck SAKey
			if err := d.SAKey(&ck, vc, 0x80001234, v); err != nil {
				t.Fatalf("%v: %v", s.scope, err)
			}
			if got := ck.Hex(); got != want || ck.Version() != v {
				t.Errorf("%v v%d: %s, want %s", s.scope, v, got, want)
			}
		}
	}
}

// TestPSPVectors: PSP's own SA-key vectors (Architecture Specification, Nov
// 2022), with PSP's master keys in the role of SK: MK0 for even
// generations, MK1 for odd ones.
func TestPSPVectors(t *testing.T) {
	mk0 := mustKey(t, "34448a064292601b11a0978f56a2d34cf3fc35ede1a6bc04f8db3e5243a2b0ca")
	mk1 := mustKey(t, "563952565d3a78ae773ec1b779f2f2d99f4a7f53a6fbb9b07d5b71f39364d739")
	tests := []struct {
		mk   *Key
		gen  Generation
		spi  SPI
		v    Version
		want string
	}{
		{&mk0, 0, 0x12345678, PSPv0, "96c22dc799198090b74b70ae468e4e30"},
		{&mk1, 1, 0x9a345678, PSPv0, "3946da2554eae46ad1ef77a64372edc4"},
		{&mk0, 0, 0x12345678, PSPv1, "2b7d72074e42ca334487f2990e3f8c4037e436f38283449b76463e9b7fb2e3de"},
	}
	for _, tt := range tests {
		d, err := NewDeriver(tt.mk[:], Scope{Level: LevelServer, Generation: tt.gen, HasGeneration: true})
		if err != nil {
			t.Fatal(err)
		}
		var ck SAKey
		if err := d.SAKey(&ck, VC{}, tt.spi, tt.v); err != nil {
			t.Fatal(err)
		}
		if got := hex.EncodeToString(ck.Bytes()); got != tt.want {
			t.Errorf("spi %s v%d: %s, want %s", tt.spi, tt.v, got, tt.want)
		}
	}
}
