package gateway

import (
	"crypto/aes"
	"crypto/cipher"
	"encoding/binary"
	"log/slog"
	"net/netip"
	"testing"
	"time"

	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/control"
	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/packet"
	"github.com/enclavekeys/enclave/internal/sa"
)

// The gateway's per-packet cost on a data packet of a pair it reads,
// against the raw AES-GCM of the same machine and run, on the same bytes
// (1400-byte inner packets, decrypted into a buffer of their own):
//
//	raw      crypto/cipher AES-256-GCM with a prepared key: the baseline
//	open     the gateway's opener with the pair key, cache warm: parse,
//	         find the prepared SA key, authenticate and decrypt
//	inspect  the whole judgement of onData: open, the inner 5-tuple, the
//	         flow's counters and verdict, the metrics
//
// go test ./internal/gateway -run '^$' -bench Gateway -benchmem

const benchDesignOK = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"

func BenchmarkGateway(b *testing.B) {
	const size = 1400
	g, pkt, raw := benchRun(b, 1)
	dst := make([]byte, 0, size)
	w := newWorker()
	src, to := netip.MustParseAddrPort("10.98.1.2:1000"), netip.MustParseAddrPort("10.98.2.2:1000")
	var p packet.Parsed
	if _, err := g.opener.OpenInto(dst, &p, pkt); err != nil { // warm the cache
		b.Fatal(err)
	}
	run := func(name string, f func() bool) {
		b.Run(name, func(b *testing.B) {
			b.SetBytes(size)
			b.ReportAllocs()
			for b.Loop() {
				if !f() {
					b.Fatal("refused")
				}
			}
		})
	}
	run("raw", func() bool {
		_, err := raw.Open(dst[:0], pkt[4:16], pkt[packet.HeaderLen:], pkt[:packet.HeaderLen])
		return err == nil
	})
	run("open", func() bool {
		_, err := g.opener.OpenInto(dst[:0], &p, pkt)
		return err == nil
	})
	run("inspect", func() bool { w.now = time.Now(); return g.onData(w, pkt, src, to) })
}

// benchRun is a run of n datagrams of one SA of pair 1-2 (1400-byte inner
// packets of one TCP flow, IVs rising), as an agent sends it, and a
// gateway core that reads the pair, and the SA's key as raw AES-GCM (the
// baseline).
func benchRun(tb testing.TB, n int) (*Gateway, []byte, cipher.AEAD) {
	tb.Helper()
	const size = 1400
	ok, _ := keys.ParseKey(benchDesignOK)
	ek, _ := keys.PairKey(&ok, 1, 2, 1)
	vc := keys.VC{Enclave: 2, Peer: 1, Server: 20}
	g, err := newCore(Config{Logger: slog.New(slog.DiscardHandler), Now: time.Now}, ca.Identity{Name: "gw", Role: ca.RoleGateway, Enclave: 1})
	if err != nil {
		tb.Fatal(err)
	}
	if err := g.table.Add(sa.Entry{Level: keys.LevelPair, Enclave: 1, Peer: 2, Generation: 1}, ek[:]); err != nil {
		tb.Fatal(err)
	}
	sk, _ := keys.ServerKey(&ek, vc)
	ck, _ := keys.SAKeyFromServer(&sk, 0x80000001, keys.PSPv1)
	out, err := sa.NewOutbound(sa.Config{SPI: 0x80000001, VC: vc, Version: keys.PSPv1, Key: ck.Bytes()})
	if err != nil {
		tb.Fatal(err)
	}
	inner := make([]byte, size) // an IPv4 TCP packet 100.64.1.1:40000 -> 100.64.2.1:7
	inner[0], inner[9] = 0x45, protoTCP
	binary.BigEndian.PutUint16(inner[2:], size)
	copy(inner[12:], []byte{100, 64, 1, 1, 100, 64, 2, 1})
	binary.BigEndian.PutUint16(inner[20:], 40000)
	binary.BigEndian.PutUint16(inner[22:], 7)
	var run []byte
	for range n {
		pkt, err := out.Seal(make([]byte, size+packet.Overhead), packet.NextIPv4, inner)
		if err != nil {
			tb.Fatal(err)
		}
		run = append(run, pkt...)
	}
	c, _ := aes.NewCipher(ck.Bytes())
	raw, _ := cipher.NewGCM(c)
	return g, run, raw
}

// BenchmarkGatewayRun: a run of 40 datagrams judged whole (cut at the
// kernel's segment size, every datagram opened, its flow counted and
// judged), against raw
// AES-GCM opening the same 40 datagrams; bytes are the inner bytes.
//
//	go test ./internal/gateway -run '^$' -bench GatewayRun -benchmem
func BenchmarkGatewayRun(b *testing.B) {
	const n, size = 40, 1400
	g, run, raw := benchRun(b, n)
	w := newWorker()
	dst := make([]byte, 0, size)
	src, to := netip.MustParseAddrPort("10.98.1.2:1000"), netip.MustParseAddrPort("10.98.2.2:1000")
	seg := size + packet.Overhead
	b.Run("raw", func(b *testing.B) {
		b.SetBytes(n * size)
		b.ReportAllocs()
		for b.Loop() {
			for off := 0; off < len(run); off += seg {
				p := run[off : off+seg]
				if _, err := raw.Open(dst[:0], p[4:16], p[packet.HeaderLen:], p[:packet.HeaderLen]); err != nil {
					b.Fatal(err)
				}
			}
		}
	})
	b.Run("run", func(b *testing.B) {
		b.SetBytes(n * size)
		b.ReportAllocs()
		for b.Loop() {
			w.now = g.cfg.Now()
			if !g.onRun(w, run, seg, src, to) {
				b.Fatal("refused")
			}
		}
	})
}

// TestRunsAllocateNothing: judging a run whole, inline (cut and judge)
// or on a relay (unframe, judge, collect what goes on), allocates nothing
// per datagram once its flow is known.
func TestRunsAllocateNothing(t *testing.T) {
	const n = 40
	g, run, _ := benchRun(t, n)
	w := newWorker()
	src, to := netip.MustParseAddrPort("10.98.1.2:1000"), netip.MustParseAddrPort("10.98.2.2:1000")
	w.now = g.cfg.Now()
	size := len(run) / n
	if !g.onRun(w, run, size, src, to) {
		t.Fatal("the run was refused")
	}
	if a := testing.AllocsPerRun(50, func() { g.onRun(w, run, size, src, to) }); a != 0 {
		t.Errorf("inline: %v allocations per run of %d", a, n)
	}
	// The same datagrams framed for a relay, back to back.
	var framed []byte
	for off := 0; off < len(run); off += size {
		f := make([]byte, control.MaxRelayHeader+size)
		hl, err := control.PutRelayHeader(f, to)
		if err != nil {
			t.Fatal(err)
		}
		framed = append(framed, f[:hl+copy(f[hl:], run[off:off+size])]...)
	}
	r := &relay{g: g}
	out, dsts := make([][]byte, 0, n), make([]netip.AddrPort, 0, n)
	fseg := len(framed) / n
	if out, _ = r.judgeDown(w, framed, fseg, src, out, dsts); len(out) != n {
		t.Fatalf("the relay passed %d of %d datagrams", len(out), n)
	}
	if a := testing.AllocsPerRun(50, func() { r.judgeDown(w, framed, fseg, src, out[:0], dsts[:0]) }); a != 0 {
		t.Errorf("relay: %v allocations per run of %d", a, n)
	}
}
