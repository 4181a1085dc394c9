package sa

import (
	"crypto/aes"
	"crypto/cipher"
	"fmt"
	"testing"

	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/packet"
)

// The data-plane benchmarks. Every variant works on the same bytes in the
// same run, decrypting or encrypting into a separate buffer (no copies in
// the loop):
//
//	raw        crypto/cipher AES-256-GCM with a prepared key: the baseline
//	sa         a known SA (Inbound/Outbound): parse, key, replay window
//	cached     the stateless Opener/Sealer with a warm cache over 1,000 SAs
//	miss       the Opener/Sealer with a 16-entry cache cycled over 1,000
//	           SAs: every packet misses, derives its key, prepares it and
//	           publishes it to the cache
//	stateless  the same, deriving every packet's key from its server key,
//	           across 1,000 SAs, with no cache
//	stateless-pair, stateless-org: the same from a pair key (a gateway) and
//	           from the org key (a monitor)

const benchSAs = 1000

var benchSizes = []int{64, 512, 1400}

// benchSet is 1,000 SAs of one server (3,7,258) at generation 1, sealed.
type benchSet struct {
	pkts     [][]byte // one packet per SA (for the stateless variants)
	saPkts   [][]byte // consecutive packets of SA 0 (for raw and sa)
	inbound  *Inbound
	outbound *Outbound
	inner    []byte
}

func newBenchSet(b *testing.B, size int) *benchSet {
	b.Helper()
	ok, _ := keys.ParseKey(designOK)
	sealer := NewSealer(benchTable(b, "org"), 0)
	bs := &benchSet{inner: make([]byte, size)}
	for i := 0; i < benchSAs; i++ {
		spi, _ := keys.NewSPI(1, uint32(i+1))
		h := packet.Header{NextHeader: packet.NextIPv4, Version: keys.PSPv1, SPI: spi, IV: 1, VC: designVC}
		pkt, err := sealer.Seal(make([]byte, size+packet.Overhead), &h, bs.inner)
		if err != nil {
			b.Fatal(err)
		}
		bs.pkts = append(bs.pkts, pkt)
	}
	// SA 0's key, for the stateful and raw variants.
	ek, _ := keys.PairKey(&ok, 3, 7, 1)
	sk, _ := keys.ServerKey(&ek, designVC)
	ck, _ := keys.SAKeyFromServer(&sk, 0x80000001, keys.PSPv1)
	cfg := Config{SPI: 0x80000001, VC: designVC, Version: keys.PSPv1, Key: ck.Bytes()}
	var err error
	if bs.outbound, err = NewOutbound(cfg); err != nil {
		b.Fatal(err)
	}
	if bs.inbound, err = NewInbound(cfg); err != nil {
		b.Fatal(err)
	}
	for i := 0; i < 1024; i++ {
		pkt, err := bs.outbound.Seal(make([]byte, size+packet.Overhead), packet.NextIPv4, bs.inner)
		if err != nil {
			b.Fatal(err)
		}
		bs.saPkts = append(bs.saPkts, pkt)
	}
	return bs
}

// runSized runs f as the sub-benchmark size=N/name, with i counting calls.
func runSized(b *testing.B, size int, name string, f func(i int) error) {
	b.Run(fmt.Sprintf("size=%d/%s", size, name), func(b *testing.B) {
		b.SetBytes(int64(size))
		b.ReportAllocs()
		i := 0
		for b.Loop() {
			if err := f(i); err != nil {
				b.Fatal(err)
			}
			i++
		}
	})
}

func benchTable(b testing.TB, level string) *KeyTable {
	return tables(b)[level]
}

func rawAEAD(b *testing.B, set *benchSet) cipher.AEAD {
	ok, _ := keys.ParseKey(designOK)
	ek, _ := keys.PairKey(&ok, 3, 7, 1)
	sk, _ := keys.ServerKey(&ek, designVC)
	ck, _ := keys.SAKeyFromServer(&sk, 0x80000001, keys.PSPv1)
	c, err := aes.NewCipher(ck.Bytes())
	if err != nil {
		b.Fatal(err)
	}
	g, err := cipher.NewGCM(c)
	if err != nil {
		b.Fatal(err)
	}
	return g
}

func BenchmarkOpen(b *testing.B) {
	for _, size := range benchSizes {
		set := newBenchSet(b, size)
		out := make([]byte, 0, size)
		run := func(name string, f func(i int) error) { runSized(b, size, name, f) }
		raw := rawAEAD(b, set)
		nonce := make([]byte, 12) // on the heap: the interface call would move it there per call
		run("raw", func(i int) error {
			var p packet.Parsed
			_ = packet.Parse(&p, set.saPkts[i%len(set.saPkts)])
			n := p.Nonce()
			copy(nonce, n[:])
			_, err := raw.Open(out, nonce, p.Sealed, p.AAD)
			return err
		})
		run("sa", func(i int) error {
			j := i % len(set.saPkts)
			if j == 0 {
				set.inbound.mu.Lock()
				set.inbound.window.Reset() // replay the ring of packets
				set.inbound.mu.Unlock()
			}
			var p packet.Parsed
			_, err := set.inbound.OpenInto(out, &p, set.saPkts[j])
			return err
		})
		for _, v := range []struct {
			name, level string
			cache       int
		}{
			{"cached", "server", 2 * benchSAs},
			{"miss", "server", 16},
			{"stateless", "server", 0},
			{"stateless-pair", "pair", 0},
			{"stateless-org", "org", 0},
		} {
			o := NewOpener(benchTable(b, v.level), v.cache)
			var p packet.Parsed
			for _, pkt := range set.pkts { // warm the cache, check every packet
				if _, err := o.OpenInto(out, &p, pkt); err != nil {
					b.Fatal(err)
				}
			}
			run(v.name, func(i int) error {
				var p packet.Parsed
				_, err := o.OpenInto(out, &p, set.pkts[i%benchSAs])
				return err
			})
		}
	}
}

func BenchmarkSeal(b *testing.B) {
	for _, size := range benchSizes {
		set := newBenchSet(b, size)
		buf := make([]byte, size+packet.Overhead)
		run := func(name string, f func(i int) error) { runSized(b, size, name, f) }
		raw := rawAEAD(b, set)
		nonce := make([]byte, 12)
		aad := make([]byte, packet.HeaderLen)
		run("raw", func(i int) error {
			nonce[11] = byte(i)
			raw.Seal(buf[packet.HeaderLen:packet.HeaderLen], nonce, set.inner, aad)
			return nil
		})
		run("sa", func(int) error {
			_, err := set.outbound.Seal(buf, packet.NextIPv4, set.inner)
			return err
		})
		for _, v := range []struct {
			name, level string
			cache       int
		}{
			{"cached", "server", 2 * benchSAs},
			{"miss", "server", 16},
			{"stateless", "server", 0},
			{"stateless-pair", "pair", 0},
			{"stateless-org", "org", 0},
		} {
			s := NewSealer(benchTable(b, v.level), v.cache)
			headers := make([]packet.Header, benchSAs)
			for i := range headers {
				spi, _ := keys.NewSPI(1, uint32(i+1))
				headers[i] = packet.Header{NextHeader: packet.NextIPv4, Version: keys.PSPv1, SPI: spi, IV: 1, VC: designVC}
				if _, err := s.Seal(buf, &headers[i], set.inner); err != nil {
					b.Fatal(err)
				}
			}
			run(v.name, func(i int) error {
				h := &headers[i%benchSAs]
				h.IV++
				_, err := s.Seal(buf, h, set.inner)
				return err
			})
		}
	}
}
