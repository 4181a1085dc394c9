package keys

import (
	"errors"
	"math/rand/v2"
	"testing"
)

// TestLayoutVectors: DESIGN §3a's reference vectors, byte for byte.
func TestLayoutVectors(t *testing.T) {
	ok, err := ParseKey("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f")
	if err != nil {
		t.Fatal(err)
	}
	spi, _ := ParseSPI("80001234")
	for _, c := range []struct {
		layout, i, j   string
		k              ServerID
		ek             map[int]string
		sk, ck, skBack string
		kBack          ServerID
	}{
		{"8.8", "3.2", "7.1", 258, map[int]string{
			1: "5104989dd730ca509c001b43b238bfa5060ad2b3f052ca459959c2cf12a8a1fe",
			2: "98a298449486408063f28959f2cfdb75475012b61e50922f131de3d3f2a09809"},
			"94833f501da32dde5a1d965cb362bfaea3f4b44036b64c4182f8af476adb699e",
			"53ea7290363b014097f1e6a1add18dd3cb1bbc6a4f1e1c2b0b421ab334ef9432",
			"9abd1b44edc9a591da50487413eadc7ee28f87b9b3652fea52221f0de213557e", 9},
		{"6.5.5", "5.3.1", "5.3.2", 7, map[int]string{
			1: "78739e7f60e7e10f6a5c68f5c92a5a0d14846fa4c4366d8a803813406677b9d1",
			3: "ba1e231ea30d2a077e9ceb198612fef13c11b4bfaf1f7fe85a8e9e629eced777"},
			"ebb0818519039f733248dfed09f2320e522ccedff170d2a5fbfcaac194faefaf",
			"6ea68559671fedc9e4ef09763f66b64389319128336950517e297f0c5da89cd4", "", 0},
	} {
		l, err := ParseLayout(c.layout)
		if err != nil {
			t.Fatal(err)
		}
		i, err := l.ParseID(c.i)
		if err != nil {
			t.Fatal(err)
		}
		j, err := l.ParseID(c.j)
		if err != nil {
			t.Fatal(err)
		}
		for level, want := range c.ek {
			ek, err := PairKeyAt(&ok, l, level, i, j, 1)
			if err != nil || ek.Hex() != want {
				t.Errorf("layout %s EK_%d(%s,%s): %s %v, want %s", c.layout, level, c.i, c.j, ek.Hex(), err, want)
			}
			if back, _ := PairKeyAt(&ok, l, level, j, i, 1); back.Hex() != want {
				t.Errorf("layout %s EK_%d is not symmetric", c.layout, level)
			}
		}
		sk, err := ServerKeyAt(&ok, l, VC{Enclave: i, Peer: j, Server: c.k}, 1)
		if err != nil || sk.Hex() != c.sk {
			t.Errorf("layout %s SK(%s,%s,%d): %s %v", c.layout, c.i, c.j, c.k, sk.Hex(), err)
		}
		ck, err := SAKeyFromServer(&sk, spi, PSPv1)
		if err != nil || ck.Hex() != c.ck {
			t.Errorf("layout %s CK: %s %v", c.layout, ck.Hex(), err)
		}
		if c.skBack != "" {
			back, err := ServerKeyAt(&ok, l, VC{Enclave: j, Peer: i, Server: c.kBack}, 1)
			if err != nil || back.Hex() != c.skBack {
				t.Errorf("layout %s SK(%s,%s,%d): %s %v", c.layout, c.j, c.i, c.kBack, back.Hex(), err)
			}
		}
		// A holder of EK_1 derives the deepest pair key itself.
		ek1, _ := PairKeyAt(&ok, l, 1, i, j, 1)
		deep, _ := PairKeyAt(&ok, l, l.Levels(), i, j, 1)
		if got, err := SubPairKey(&ek1, l, 2, l.Levels(), i, j); err != nil || !got.Equal(&deep) {
			t.Errorf("layout %s: EK_%d from EK_1: %v", c.layout, l.Levels(), err)
		}
	}
}

// TestDefaultLayoutIsSection3: the one-level layout is §3's schedule.
func TestDefaultLayoutIsSection3(t *testing.T) {
	ok, _ := ParseKey("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f")
	for _, l := range []Layout{{}, mustLayout(t, "16")} {
		ek, err := PairKeyAt(&ok, l, 1, 3, 7, 1)
		if err != nil || ek.Hex() != "fb96994d8420bbb6e8afbf09c1d2bf15e7fc77f478aa0ea457e0acb4454a3529" {
			t.Fatalf("layout %s EK(3,7,1): %s %v", l, ek.Hex(), err)
		}
		sk, _ := ServerKeyAt(&ok, l, VC{Enclave: 3, Peer: 7, Server: 258}, 1)
		if sk.Hex() != "9192dff597d48617d695adafb93333ba50ba77e90d81e36d9723defbef70a9ae" {
			t.Fatalf("layout %s SK(3,7,258,1): %s", l, sk.Hex())
		}
		if id, err := l.ParseID("3"); err != nil || id != 3 || l.FormatID(3) != "3" {
			t.Fatalf("layout %s: 3 is %v %v", l, id, err)
		}
	}
}

func mustLayout(t *testing.T, s string) Layout {
	t.Helper()
	l, err := ParseLayout(s)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// TestLayoutParsing: layouts and dotted ids, and what is refused.
func TestLayoutParsing(t *testing.T) {
	l := mustLayout(t, "8.8")
	for in, want := range map[string]EnclaveID{"3.2": 0x0302, "3": 0x0300, "3.0": 0x0300, "255.255": 0xffff, "0.1": 0x0001} {
		if got, err := l.ParseID(in); err != nil || got != want {
			t.Errorf("8.8 %q: %#x %v, want %#x", in, got, err, want)
		}
	}
	for _, in := range []string{"256.1", "3.256", "1.2.3", "", "x", "0", "0.0", "-1"} {
		if _, err := l.ParseID(in); !errors.Is(err, ErrDotted) {
			t.Errorf("8.8 %q: %v", in, err)
		}
	}
	if s := mustLayout(t, "6.5.5").FormatID(0x1461); s != "5.3.1" {
		t.Errorf("6.5.5 0x1461 is %s", s)
	}
	if p, _ := mustLayout(t, "6.5.5").Prefix(2, 0x1461); p != 0x1460 {
		t.Errorf("P_2(5.3.1) = %#x", p)
	}
	for _, in := range []string{"", "8.7", "8.9", "0.16", "17", "8.8.0", "a.b", "1.1.1.1.1.1.1.1.1.1.1.1.1.1.1.1.0"} {
		if _, err := ParseLayout(in); !errors.Is(err, ErrLayout) {
			t.Errorf("layout %q: %v", in, err)
		}
	}
	if _, err := PairKeyAt(&Key{}, l, 3, 1, 2, 1); !errors.Is(err, ErrLayoutLevel) {
		t.Errorf("level 3 of 8.8: %v", err)
	}
}

// FuzzParseDottedID: dotted ids never panic, and parse back to what they say.
func FuzzParseDottedID(f *testing.F) {
	for _, s := range []string{"3.2", "5.3.1", "255.255", "1.", ".1", "99999999999999999999"} {
		f.Add("8.8", s)
		f.Add("6.5.5", s)
	}
	f.Fuzz(func(t *testing.T, layout, id string) {
		l, err := ParseLayout(layout)
		if err != nil {
			return
		}
		v, err := l.ParseID(id)
		if err != nil {
			return
		}
		if back, err := l.ParseID(l.FormatID(v)); err != nil || back != v {
			t.Fatalf("%s %q: %#x, formatted %s, back %#x %v", layout, id, v, l.FormatID(v), back, err)
		}
	})
}

// randomLayout is a layout of 1 to 5 levels.
func randomLayout(r *rand.Rand) Layout {
	n := 1 + r.IntN(5)
	ws := make([]int, n)
	left := 16
	for i := range ws {
		if i == n-1 {
			ws[i] = left
			break
		}
		ws[i] = 1 + r.IntN(left-(n-1-i))
		left -= ws[i]
	}
	l, err := NewLayout(ws...)
	if err != nil {
		panic(err)
	}
	return l
}

// TestLayoutProperties: for random layouts and ids, every pair key is
// symmetric, and a Deriver holding EK_L(i,j) derives exactly the server
// keys beneath it (those ServerKeyAt gives from the org key) and refuses
// every VC outside it.
func TestLayoutProperties(t *testing.T) {
	r := rand.New(rand.NewPCG(33, 3))
	var ok Key
	for i := range ok {
		ok[i] = byte(i)
	}
	for range 300 {
		l := randomLayout(r)
		id := func() EnclaveID { // an id beneath an enclave of level 1
			for {
				if id := EnclaveID(1 + r.IntN(0xffff)); l.part(1, id) != 0 {
					return id
				}
			}
		}
		i, j := id(), id()
		g := Generation(1 + r.IntN(5))
		for L := 1; L <= l.Levels(); L++ {
			a, err := PairKeyAt(&ok, l, L, i, j, g)
			if err != nil {
				t.Fatal(err)
			}
			b, _ := PairKeyAt(&ok, l, L, j, i, g)
			if a != b {
				t.Fatalf("layout %s level %d: EK(%d,%d) ≠ EK(%d,%d)", l, L, i, j, j, i)
			}
			pi, _ := l.Prefix(L, i)
			pj, _ := l.Prefix(L, j)
			d, err := NewDeriver(a[:], Scope{Level: LevelPair, Enclave: pi, Peer: pj, Layout: l, Sub: L, Generation: g, HasGeneration: true})
			if err != nil {
				t.Fatalf("layout %s level %d: %v", l, L, err)
			}
			// A VC beneath: the same level-L prefixes, any lower parts.
			low := uint16(0xffff) >> l.bits(L)
			vc := VC{Enclave: pi | EnclaveID(uint16(r.Uint32())&low), Peer: pj | EnclaveID(uint16(r.Uint32())&low), Server: ServerID(r.Uint32())}
			if vc.Enclave == 0 || vc.Peer == 0 {
				continue
			}
			if r.IntN(2) == 0 {
				vc.Enclave, vc.Peer = vc.Peer, vc.Enclave
			}
			want, err := ServerKeyAt(&ok, l, vc, g)
			if err != nil {
				t.Fatal(err)
			}
			var got Key
			if err := d.ServerKey(&got, vc); err != nil || got != want {
				t.Fatalf("layout %s: EK_%d derives SK(%v) = %x, %v; want %x", l, L, vc, got[:4], err, want[:4])
			}
			spi := SPI(g.Parity()<<31 | 7)
			var ck SAKey
			if err := d.SAKey(&ck, vc, spi, PSPv1); err != nil {
				t.Fatal(err)
			}
			if wck, _ := SAKeyFromServer(&want, spi, PSPv1); ck != wck {
				t.Fatalf("layout %s: SA key from EK_%d differs from the server key's", l, L)
			}
			// A VC outside: change a part at or above level L.
			out := vc
			flip := EnclaveID(1) << (16 - l.bits(1+r.IntN(L)))
			out.Enclave ^= flip
			if p, _ := l.Prefix(L, out.Enclave); l.part(1, out.Enclave) == 0 || (p == pi || p == pj) {
				continue // still an id of the pair (i, j share a prefix) or 0
			}
			if err := d.ServerKey(&got, out); !errors.Is(err, ErrScope) {
				t.Fatalf("layout %s: EK_%d(%s,%s) derived for %v: %v", l, L, l.FormatID(pi), l.FormatID(pj), out, err)
			}
		}
	}
}

// TestLayoutIDs: levels, nesting, parents and short forms.
func TestLayoutIDs(t *testing.T) {
	l, _ := ParseLayout("6.5.5")
	for _, c := range []struct {
		s      string
		level  int
		nested bool
		parent string
		short  string
	}{
		{"5", 1, true, "", "5"},
		{"5.3", 2, true, "5", "5.3"},
		{"5.3.1", 3, true, "5.3", "5.3.1"},
		{"5.0.1", 3, false, "5", "5.0.1"},
		{"0.1", 2, false, "", "0.1"},
	} {
		id, err := l.ParseID(c.s)
		if err != nil {
			t.Fatal(err)
		}
		if l.Level(id) != c.level || l.Nested(id) != c.nested || l.Short(id) != c.short {
			t.Errorf("%s: level %d nested %v short %s", c.s, l.Level(id), l.Nested(id), l.Short(id))
		}
		if p := l.Parent(id); (p == 0) != (c.parent == "") || (p != 0 && l.Short(p) != c.parent) {
			t.Errorf("%s: parent %s", c.s, l.Short(p))
		}
	}
	if d, _ := ParseLayout("16"); !d.IsDefault() || d != (Layout{}) {
		t.Error("layout 16 is not the default")
	}
}
