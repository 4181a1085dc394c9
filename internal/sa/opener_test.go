package sa

import (
	"bytes"
	"errors"
	"fmt"
	"sync"
	"testing"

	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/packet"
	"github.com/enclavekeys/enclave/internal/testvec"
)

// tables returns a table at each level that covers the DESIGN packet.
func tables(t testing.TB) map[string]*KeyTable {
	t.Helper()
	server, pair, org := NewKeyTable(0), NewKeyTable(0), NewKeyTable(0)
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(server.Add(Entry{Level: keys.LevelServer, Enclave: 3, Peer: 7, Server: 258, Generation: 1}, testvec.Hex(t, designSK)))
	must(pair.Add(Entry{Level: keys.LevelPair, Enclave: 7, Peer: 3, Generation: 1}, testvec.Hex(t, designEK)))
	must(org.Add(Entry{Level: keys.LevelOrg, Generation: 1}, testvec.Hex(t, designOK)))
	return map[string]*KeyTable{"server": server, "pair": pair, "org": org}
}

// TestOpenerEveryLevel: the DESIGN packet opens from a server key, a pair
// key and the org key, with and without the cache, and with no SA state.
func TestOpenerEveryLevel(t *testing.T) {
	inner := testvec.Hex(t, designInner)
	for name, table := range tables(t) {
		for _, cacheSize := range []int{0, 16} {
			o := NewOpener(table, cacheSize)
			for round := 0; round < 3; round++ {
				var p packet.Parsed
				got, err := o.Open(&p, testvec.Hex(t, designPacket))
				if err != nil || !bytes.Equal(got, inner) {
					t.Fatalf("%s cache %d round %d: %x, %v", name, cacheSize, round, got, err)
				}
			}
			if cacheSize > 0 && o.Cache().Misses() != 1 {
				t.Fatalf("%s: %d cache misses for 3 packets of one SA", name, o.Cache().Misses())
			}
		}
	}
}

// TestOpenerLeastPrivilege: a key opens exactly the traffic beneath it.
func TestOpenerLeastPrivilege(t *testing.T) {
	ok, _ := keys.ParseKey(designOK)
	mk := func(vc keys.VC, g keys.Generation, idx uint32) []byte {
		return sealUnder(t, &ok, keys.Layout{}, vc, g, idx)
	}
	tb := tables(t)
	cases := []struct {
		table string
		vc    keys.VC
		g     keys.Generation
		want  error
	}{
		{"server", keys.VC{Enclave: 3, Peer: 7, Server: 258}, 1, nil},
		{"server", keys.VC{Enclave: 3, Peer: 7, Server: 259}, 1, ErrNoKey},       // another server
		{"server", keys.VC{Enclave: 3, Peer: 8, Server: 258}, 1, ErrNoKey},       // another peer enclave
		{"server", keys.VC{Enclave: 3, Peer: 7, Server: 258}, 2, ErrGeneration},  // the other parity
		{"server", keys.VC{Enclave: 3, Peer: 7, Server: 258}, 3, packet.ErrAuth}, // same parity, newer generation
		{"pair", keys.VC{Enclave: 7, Peer: 3, Server: 9}, 1, nil},
		{"pair", keys.VC{Enclave: 3, Peer: 7, Server: 12345}, 1, nil},
		{"pair", keys.VC{Enclave: 3, Peer: 9, Server: 258}, 1, ErrNoKey},
		{"pair", keys.VC{Enclave: 3, Peer: 7, Server: 258}, 0, ErrGeneration},
		{"org", keys.VC{Enclave: 100, Peer: 200, Server: 1}, 1, nil},
		{"org", keys.VC{Enclave: 100, Peer: 200, Server: 1}, 2, ErrGeneration},
	}
	for _, c := range cases {
		for _, cacheSize := range []int{0, 8} {
			o := NewOpener(tb[c.table], cacheSize)
			var p packet.Parsed
			_, err := o.Open(&p, mk(c.vc, c.g, 77))
			if !errors.Is(err, c.want) {
				t.Errorf("%s key, VC %+v, generation %d, cache %d: %v, want %v", c.table, c.vc, c.g, cacheSize, err, c.want)
			}
		}
	}
}

// TestOpenerRotation: a removed or replaced key stops opening at once, even
// for SAs whose keys are cached.
func TestOpenerRotation(t *testing.T) {
	table := tables(t)["server"]
	o := NewOpener(table, 64)
	var p packet.Parsed
	if _, err := o.Open(&p, testvec.Hex(t, designPacket)); err != nil {
		t.Fatal(err)
	}
	e := Entry{Level: keys.LevelServer, Enclave: 3, Peer: 7, Server: 258, Generation: 1}
	if table.Remove(Entry{Level: keys.LevelServer, Enclave: 3, Peer: 7, Server: 258, Generation: 3}) {
		t.Fatal("removed a generation the table does not hold")
	}
	if !table.Remove(e) {
		t.Fatal("Remove failed")
	}
	if _, err := o.Open(&p, testvec.Hex(t, designPacket)); !errors.Is(err, ErrNoKey) {
		t.Fatalf("after removal: %v", err)
	}
	if err := table.Add(e, testvec.Hex(t, designSK)); err != nil {
		t.Fatal(err)
	}
	if _, err := o.Open(&p, testvec.Hex(t, designPacket)); err != nil {
		t.Fatalf("after re-adding: %v", err)
	}
	// Generation 3 replaces generation 1 (same parity): the old packets stop.
	if err := table.Add(Entry{Level: keys.LevelServer, Enclave: 3, Peer: 7, Server: 258, Generation: 3}, make([]byte, 32)); err != nil {
		t.Fatal(err)
	}
	if table.Len() != 1 {
		t.Fatalf("table holds %d keys, want 1", table.Len())
	}
	if _, err := o.Open(&p, testvec.Hex(t, designPacket)); !errors.Is(err, packet.ErrAuth) {
		t.Fatalf("after rotation: %v", err)
	}
	st := o.Stats()
	if st.Packets != 2 || st.Drops["no_key"] != 1 || st.Drops["auth"] != 1 {
		t.Fatalf("stats %+v", st)
	}
}

func TestKeyTableCapacity(t *testing.T) {
	table := NewKeyTable(2)
	for i := keys.EnclaveID(1); i <= 2; i++ {
		if err := table.Add(Entry{Level: keys.LevelPair, Enclave: i, Peer: 9, Generation: 1}, make([]byte, 32)); err != nil {
			t.Fatal(err)
		}
	}
	if err := table.Add(Entry{Level: keys.LevelPair, Enclave: 3, Peer: 9, Generation: 1}, make([]byte, 32)); !errors.Is(err, ErrTableFull) {
		t.Fatalf("third key: %v", err)
	}
	// Replacing a slot is allowed when full.
	if err := table.Add(Entry{Level: keys.LevelPair, Enclave: 9, Peer: 1, Generation: 3}, make([]byte, 32)); err != nil {
		t.Fatalf("rotation in a full table: %v", err)
	}
	for _, bad := range []Entry{
		{Level: keys.LevelServer, Enclave: 0, Peer: 1},
		{Level: keys.LevelPair, Enclave: 1},
		{Level: keys.LevelSA},
	} {
		if err := table.Add(bad, make([]byte, 32)); err == nil {
			t.Errorf("Add(%+v) accepted", bad)
		}
	}
	if err := NewKeyTable(0).Add(Entry{Level: keys.LevelOrg}, make([]byte, 31)); !errors.Is(err, keys.ErrKeyLength) {
		t.Errorf("short key: %v", err)
	}
}

// TestSealerMatchesSA: the stateless sealer produces exactly the packets of
// the stateful SA.
func TestSealerMatchesSA(t *testing.T) {
	out, _ := designPair(t)
	for _, cacheSize := range []int{0, 4} {
		s := NewSealer(tables(t)["pair"], cacheSize)
		for iv := uint64(1); iv <= 3; iv++ {
			h := packet.Header{NextHeader: packet.NextIPv4, Version: keys.PSPv1, SPI: 0x80001234, IV: iv, VC: designVC}
			got, err := s.Seal(make([]byte, 100), &h, testvec.Hex(t, designInner))
			if err != nil {
				t.Fatal(err)
			}
			if iv == 1 && !bytes.Equal(got, testvec.Hex(t, designPacket)) {
				t.Fatalf("sealer's first packet is not the DESIGN example")
			}
		}
	}
	_ = out
	s := NewSealer(tables(t)["server"], 0)
	h := packet.Header{NextHeader: packet.NextIPv4, Version: keys.PSPv1, SPI: 0x80001234, IV: 1, VC: keys.VC{Enclave: 3, Peer: 8, Server: 258}}
	if _, err := s.Seal(make([]byte, 100), &h, nil); !errors.Is(err, ErrNoKey) {
		t.Fatalf("sealing outside the table: %v", err)
	}
}

// TestCacheEviction: a cache smaller than the working set still answers
// correctly, and concurrent use is safe (run with -race).
func TestCacheEviction(t *testing.T) {
	table := tables(t)["pair"]
	o := NewOpener(table, 8)
	s := NewSealer(table, 0)
	const sas = 200
	pkts := make([][]byte, sas)
	for i := range pkts {
		spi, _ := keys.NewSPI(1, uint32(i+1))
		h := packet.Header{NextHeader: packet.NextIPv4, Version: keys.PSPv1, SPI: spi, IV: 1, VC: keys.VC{Enclave: 3, Peer: 7, Server: keys.ServerID(i % 5)}}
		pkt, err := s.Seal(make([]byte, 64), &h, []byte(fmt.Sprint(i)))
		if err != nil {
			t.Fatal(err)
		}
		pkts[i] = pkt
	}
	var wg sync.WaitGroup
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			var p packet.Parsed
			for r := 0; r < 20; r++ {
				for i := range pkts {
					got, err := o.Open(&p, bytes.Clone(pkts[(i*7+w)%sas]))
					if err != nil || string(got) != fmt.Sprint((i*7+w)%sas) {
						t.Errorf("SA %d: %q, %v", (i*7+w)%sas, got, err)
						return
					}
				}
			}
		}(w)
	}
	wg.Wait()
	if o.Cache().Size() != 8 || o.Cache().Misses() < sas || o.Stats().Packets != 4*20*sas {
		t.Fatalf("cache size %d, %d misses, %d packets", o.Cache().Size(), o.Cache().Misses(), o.Stats().Packets)
	}
}

// TestOpenerNoAllocs: once a packet's SA key is in the cache, opening
// allocates nothing, whatever level the table holds. (Without a cache
// every packet prepares a fresh AES-GCM key, which allocates; that cost is
// measured by BenchmarkOpen/stateless, not asserted here.)
func TestOpenerNoAllocs(t *testing.T) {
	for name, table := range tables(t) {
		o := NewOpener(table, 16)
		pkt := testvec.Hex(t, designPacket)
		buf := make([]byte, len(pkt))
		var p packet.Parsed
		n := testing.AllocsPerRun(50, func() {
			copy(buf, pkt)
			if _, err := o.Open(&p, buf); err != nil {
				t.Fatal(err)
			}
		})
		if n != 0 {
			t.Errorf("%s key, cached: %v allocations per packet", name, n)
		}
	}
}

// FuzzOpener: arbitrary packets against an org-level opener never panic,
// and every refusal is a known drop cause; nothing but a sealed packet opens.
func FuzzOpener(f *testing.F) {
	f.Add(testvec.Hex(f, designPacket))
	f.Add(make([]byte, 40))
	o := NewOpener(tables(f)["org"], 4)
	good := testvec.Hex(f, designPacket)
	f.Fuzz(func(t *testing.T, pkt []byte) {
		var p packet.Parsed
		in := bytes.Clone(pkt)
		_, err := o.Open(&p, in)
		if err == nil && !bytes.Equal(pkt, good) {
			t.Fatalf("forged packet opened: %x", pkt)
		}
		if err != nil && dropCause(err) == packet.CauseOther {
			t.Fatalf("error without a drop cause: %v", err)
		}
	})
}

// TestMonitorTwoGenerations: a monitor holding the org key at the current
// and previous generation opens traffic of both, and nothing older.
func TestMonitorTwoGenerations(t *testing.T) {
	ok, _ := keys.ParseKey(designOK)
	table := NewKeyTable(0)
	for _, g := range []keys.Generation{4, 5} {
		if err := table.Add(Entry{Level: keys.LevelOrg, Generation: g}, ok[:]); err != nil {
			t.Fatal(err)
		}
	}
	o := NewOpener(table, 0)
	vc := keys.VC{Enclave: 11, Peer: 12, Server: 13}
	for _, c := range []struct {
		g    keys.Generation
		want error
	}{{4, nil}, {5, nil}, {3, packet.ErrAuth}, {6, packet.ErrAuth}} {
		ek, _ := keys.PairKey(&ok, vc.Enclave, vc.Peer, c.g)
		sk, _ := keys.ServerKey(&ek, vc)
		spi, _ := keys.NewSPI(c.g, 99)
		ck, _ := keys.SAKeyFromServer(&sk, spi, keys.PSPv1)
		h := packet.Header{NextHeader: packet.NextIPv4, Version: keys.PSPv1, SPI: spi, IV: 1, VC: vc}
		pkt, _ := packet.Seal(make([]byte, 64), &h, gcmFor(t, ck.Bytes()), []byte("m"))
		var p packet.Parsed
		if _, err := o.Open(&p, pkt); !errors.Is(err, c.want) {
			t.Errorf("generation %d: %v, want %v", c.g, err, c.want)
		}
	}
}

// TestOpenerSubEnclaves: under layout 8.8 a table holding EK_2(3.1,7.2)
// opens exactly that sub-pair's packets; one holding EK_1(3,7) opens every
// sub-pair of 3-7 (DESIGN §3a); the org key opens all.
func TestOpenerSubEnclaves(t *testing.T) {
	l, _ := keys.ParseLayout("8.8")
	ok, _ := keys.ParseKey(designOK)
	id := func(s string) keys.EnclaveID {
		v, err := l.ParseID(s)
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	mk := func(vc keys.VC) []byte { return sealUnder(t, &ok, l, vc, 1, 5) }
	table := func(level int, i, j string) *KeyTable {
		tb := NewKeyTable(0)
		tb.SetLayout(l)
		e, k := Entry{Level: keys.LevelOrg, Generation: 1}, ok
		if level > 0 {
			e = Entry{Level: keys.LevelPair, Enclave: id(i), Peer: id(j), Generation: 1, Sub: level}
			var err error
			if k, err = keys.PairKeyAt(&ok, l, level, id(i), id(j), 1); err != nil {
				t.Fatal(err)
			}
		}
		if err := tb.Add(e, k[:]); err != nil {
			t.Fatal(err)
		}
		return tb
	}
	sub, whole, org := table(2, "7.2", "3.1"), table(1, "3", "7"), table(0, "", "")
	for _, c := range []struct {
		i, j      string
		sub, pair error
	}{
		{"3.1", "7.2", nil, nil},
		{"7.2", "3.1", nil, nil},
		{"3.2", "7.2", ErrNoKey, nil}, // the sibling sub-pair
		{"3.1", "7.1", ErrNoKey, nil},
		{"3", "7.2", ErrNoKey, nil}, // enclave 3 itself, not 3.1
		{"3.1", "8.2", ErrNoKey, ErrNoKey},
	} {
		pkt := mk(keys.VC{Enclave: id(c.i), Peer: id(c.j), Server: 42})
		for name, want := range map[string]error{"EK_2(3.1,7.2)": c.sub, "EK_1(3,7)": c.pair, "org": nil} {
			tb := map[string]*KeyTable{"EK_2(3.1,7.2)": sub, "EK_1(3,7)": whole, "org": org}[name]
			for _, cacheSize := range []int{0, 8} {
				var p packet.Parsed
				got, err := NewOpener(tb, cacheSize).Open(&p, bytes.Clone(pkt)) // opens in place
				if !errors.Is(err, want) || (err == nil && string(got) != "inner") {
					t.Errorf("%s opening %s-%s (cache %d): %q, %v; want %v", name, c.i, c.j, cacheSize, got, err, want)
				}
			}
		}
	}
	// Under a layout the cached path allocates nothing, as in §3's.
	pkt := mk(keys.VC{Enclave: id("3.1"), Peer: id("7.2"), Server: 42})
	buf := make([]byte, len(pkt))
	o := NewOpener(sub, 16)
	var p packet.Parsed
	if n := testing.AllocsPerRun(50, func() {
		copy(buf, pkt)
		if _, err := o.Open(&p, buf); err != nil {
			t.Fatal(err)
		}
	}); n != 0 {
		t.Errorf("EK_2 under layout 8.8, cached: %v allocations per packet", n)
	}
	// A new layout empties the table: its keys derive other SA keys.
	whole.SetLayout(keys.Layout{})
	if whole.Len() != 0 {
		t.Fatal("a new layout kept the keys of the old one")
	}
}

// sealUnder seals "inner" as the SA (vc, generation g, index idx) under
// org key ok and layout l would.
func sealUnder(t testing.TB, ok *keys.Key, l keys.Layout, vc keys.VC, g keys.Generation, idx uint32) []byte {
	t.Helper()
	sk, err := keys.ServerKeyAt(ok, l, vc, g)
	if err != nil {
		t.Fatal(err)
	}
	spi, _ := keys.NewSPI(g, idx)
	ck, _ := keys.SAKeyFromServer(&sk, spi, keys.PSPv1)
	h := packet.Header{NextHeader: packet.NextIPv4, Version: keys.PSPv1, SPI: spi, IV: 1, VC: vc}
	pkt, err := packet.Seal(make([]byte, 100), &h, gcmFor(t, ck.Bytes()), []byte("inner"))
	if err != nil {
		t.Fatal(err)
	}
	return pkt
}
