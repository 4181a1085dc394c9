package sa

import (
	"bytes"
	"errors"
	"sync"
	"testing"

	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/packet"
	"github.com/enclavekeys/enclave/internal/testvec"
)

const (
	designOK     = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
	designEK     = "fb96994d8420bbb6e8afbf09c1d2bf15e7fc77f478aa0ea457e0acb4454a3529"
	designSK     = "9192dff597d48617d695adafb93333ba50ba77e90d81e36d9723defbef70a9ae"
	designCK     = "9bd253cc0a1a23bb1960342d4073736a70e5ac3eb0bb0ba7924bac4dea4c800e"
	designInner  = "4500001c000040004011b7c40a0300010a070002656e636c61766521"
	designPacket = "0402020780001234000000000000000100030007000001027e3d8bedcd5dae07920af074" +
		"3aa7fdf44207563f23cbc95a76fdc540bee02324eb8c74a06665075d08f5338c"
)

var designVC = keys.VC{Enclave: 3, Peer: 7, Server: 258}

func designPair(t testing.TB) (*Outbound, *Inbound) {
	t.Helper()
	c := Config{SPI: 0x80001234, VC: designVC, Version: keys.PSPv1, Key: testvec.Hex(t, designCK)}
	out, err := NewOutbound(c)
	if err != nil {
		t.Fatal(err)
	}
	in, err := NewInbound(c)
	if err != nil {
		t.Fatal(err)
	}
	return out, in
}

func TestSARoundTripAndDesignPacket(t *testing.T) {
	out, in := designPair(t)
	inner := testvec.Hex(t, designInner)
	pkt, err := out.Seal(make([]byte, 200), packet.NextIPv4, inner)
	if err != nil {
		t.Fatal(err)
	}
	if got := testvec.Hex(t, designPacket); !bytes.Equal(pkt, got) {
		t.Fatalf("first packet of the SA is not the DESIGN example:\n%x", pkt)
	}
	var p packet.Parsed
	got, err := in.Open(&p, bytes.Clone(pkt))
	if err != nil || !bytes.Equal(got, inner) || p.IV != 1 {
		t.Fatalf("Open: %x, %v", got, err)
	}
	// A replay of the same bytes is refused and counted.
	if _, err := in.Open(&p, bytes.Clone(pkt)); !errors.Is(err, ErrReplay) {
		t.Fatalf("replay: %v", err)
	}
	for i := 0; i < 100; i++ {
		pkt, _ := out.Seal(make([]byte, 200), packet.NextIPv6, inner)
		if _, err := in.Open(&p, pkt); err != nil {
			t.Fatal(err)
		}
	}
	st := in.Stats()
	if st.Packets != 101 || st.Drops["replay"] != 1 || out.LastIV() != 101 {
		t.Fatalf("stats %+v, last IV %d", st, out.LastIV())
	}
}

func TestInboundRefusals(t *testing.T) {
	out, in := designPair(t)
	inner := []byte("0123456789")
	other, _ := NewOutbound(Config{SPI: 0x80001235, VC: designVC, Version: keys.PSPv1, Key: testvec.Hex(t, designCK)})
	wrongKey, _ := NewOutbound(Config{SPI: 0x80001234, VC: designVC, Version: keys.PSPv1, Key: make([]byte, 32)})
	otherVC, _ := NewOutbound(Config{SPI: 0x80001234, VC: keys.VC{Enclave: 3, Peer: 7, Server: 259}, Version: keys.PSPv1, Key: testvec.Hex(t, designCK)})
	seal := func(o *Outbound) []byte {
		pkt, err := o.Seal(make([]byte, 100), packet.NextIPv4, inner)
		if err != nil {
			t.Fatal(err)
		}
		return pkt
	}
	var p packet.Parsed
	cases := []struct {
		name  string
		pkt   []byte
		want  error
		cause string
	}{
		{"other SPI", seal(other), ErrWrongSA, "scope"},
		{"other VC", seal(otherVC), ErrWrongSA, "scope"},
		{"wrong key", seal(wrongKey), packet.ErrAuth, "auth"},
		{"truncated", seal(out)[:30], packet.ErrShort, "short"},
	}
	for _, c := range cases {
		if _, err := in.Open(&p, c.pkt); !errors.Is(err, c.want) {
			t.Errorf("%s: %v, want %v", c.name, err, c.want)
		}
	}
	st := in.Stats()
	if st.Drops["scope"] != 2 || st.Drops["auth"] != 1 || st.Drops["short"] != 1 || st.Packets != 0 {
		t.Fatalf("drops %+v", st)
	}
	// An authentic but too old packet: beyond the window after a jump.
	old := seal(out)
	for i := 0; i < 5000; i++ {
		_, _ = out.nextIV()
	}
	if _, err := in.Open(&p, seal(out)); err != nil {
		t.Fatal(err)
	}
	if _, err := in.Open(&p, old); !errors.Is(err, ErrReplay) {
		t.Fatalf("packet behind the window: %v", err)
	}
}

func TestIVNeverWrapsAndRekey(t *testing.T) {
	c := Config{SPI: 0x1, VC: designVC, Version: keys.PSPv0, Key: make([]byte, 16), RekeyAfter: 3}
	out, err := NewOutbound(c)
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 100)
	for i := 1; i <= 3; i++ {
		if out.NeedsRekey() {
			t.Fatalf("rekey asked after %d packets", i-1)
		}
		if _, err := out.Seal(buf, packet.NextIPv4, nil); err != nil {
			t.Fatal(err)
		}
	}
	if !out.NeedsRekey() {
		t.Fatal("no rekey at the threshold")
	}
	out.iv.Store(MaxIV - 1)
	if pkt, err := out.Seal(buf, packet.NextIPv4, nil); err != nil || pkt[15] != 0xff {
		t.Fatalf("last IV: %v", err)
	}
	for i := 0; i < 3; i++ {
		if _, err := out.Seal(buf, packet.NextIPv4, nil); !errors.Is(err, ErrIVExhausted) {
			t.Fatalf("after the last IV: %v", err)
		}
	}
	if out.LastIV() != MaxIV {
		t.Fatal("IV moved after exhaustion")
	}
}

func TestConfigRefusals(t *testing.T) {
	for _, c := range []Config{
		{SPI: 0, Version: keys.PSPv1, Key: make([]byte, 32)},
		{SPI: 0x80000000, Version: keys.PSPv1, Key: make([]byte, 32)},
		{SPI: 1, Version: 2, Key: make([]byte, 32)},
		{SPI: 1, Version: keys.PSPv0, Key: make([]byte, 32)},
		{SPI: 1, Version: keys.PSPv1, Key: make([]byte, 16)},
	} {
		if _, err := NewOutbound(c); err == nil {
			t.Errorf("NewOutbound(%+v) accepted", c)
		}
		if _, err := NewInbound(c); err == nil {
			t.Errorf("NewInbound(%+v) accepted", c)
		}
	}
}

// TestConcurrentSA: many goroutines seal on one SA and open on its peer;
// every packet is accepted exactly once.
func TestConcurrentSA(t *testing.T) {
	out, in := designPair(t)
	const workers, each = 8, 300
	pkts := make(chan []byte, workers*each)
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < each; i++ {
				pkt, err := out.Seal(make([]byte, 100), packet.NextIPv4, []byte("x"))
				if err != nil {
					t.Error(err)
					return
				}
				pkts <- pkt
			}
		}()
	}
	wg.Wait()
	close(pkts)
	var mu sync.Mutex
	accepted := 0
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var p packet.Parsed
			for pkt := range pkts {
				dup := bytes.Clone(pkt)
				_, err1 := in.Open(&p, pkt)
				_, err2 := in.Open(&p, dup)
				mu.Lock()
				if err1 == nil {
					accepted++
				}
				if err2 == nil {
					accepted++
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if accepted != workers*each {
		t.Fatalf("accepted %d of %d distinct packets (each sent twice)", accepted, workers*each)
	}
}

// gcmFor prepares key for the PSP version its length belongs to.
func gcmFor(t testing.TB, key []byte) *packet.AEAD {
	t.Helper()
	v := keys.PSPv1
	if len(key) == 16 {
		v = keys.PSPv0
	}
	a, err := packet.NewAEAD(v, key)
	if err != nil {
		t.Fatal(err)
	}
	return a
}
