package nic

import (
	"bytes"
	"errors"
	"fmt"
	"runtime"
	"sync"
	"testing"

	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/packet"
	"github.com/enclavekeys/enclave/internal/sa"
)

var orgKey = func() keys.Key {
	k, _ := keys.ParseKey("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f")
	return k
}()

// world is server 258 of enclave 3, talking to enclaves 7 and 8, and a
// gateway's view of pair (3, 9): the three keys of the table.
type world struct {
	entries []sa.Entry
	keys    []keys.Key
}

func newWorld(t testing.TB) *world {
	t.Helper()
	w := &world{}
	for _, peer := range []keys.EnclaveID{7, 8} {
		ek, _ := keys.PairKey(&orgKey, 3, peer, 1)
		sk, err := keys.ServerKey(&ek, keys.VC{Enclave: 3, Peer: peer, Server: 258})
		if err != nil {
			t.Fatal(err)
		}
		w.entries = append(w.entries, sa.Entry{Level: keys.LevelServer, Enclave: 3, Peer: peer, Server: 258, Generation: 1})
		w.keys = append(w.keys, sk)
	}
	ek, _ := keys.PairKey(&orgKey, 3, 9, 1)
	w.entries = append(w.entries, sa.Entry{Level: keys.LevelPair, Enclave: 3, Peer: 9, Generation: 1})
	w.keys = append(w.keys, ek)
	return w
}

// saOf returns SA n's VC, SPI and key: SAs spread over the three keys
// (for the pair key, over many servers of enclave 3).
func (w *world) saOf(t testing.TB, n int) (keys.VC, keys.SPI, keys.SAKey) {
	vc := []keys.VC{{Enclave: 3, Peer: 7, Server: 258}, {Enclave: 3, Peer: 8, Server: 258}, {Enclave: 3, Peer: 9, Server: keys.ServerID(1000 + n%50)}}[n%3]
	spi, err := keys.NewSPI(1, uint32(n+1))
	if err != nil {
		t.Fatal(err)
	}
	ek, _ := keys.PairKey(&orgKey, vc.Enclave, vc.Peer, 1)
	sk, _ := keys.ServerKey(&ek, vc)
	ck, err := keys.SAKeyFromServer(&sk, spi, keys.PSPv1)
	if err != nil {
		t.Fatal(err)
	}
	return vc, spi, ck
}

func seal(t testing.TB, vc keys.VC, spi keys.SPI, ck keys.SAKey, iv uint64, inner []byte) []byte {
	t.Helper()
	out, err := sa.NewOutbound(sa.Config{SPI: spi, VC: vc, Version: keys.PSPv1, Key: ck.Bytes()})
	if err != nil {
		t.Fatal(err)
	}
	var pkt []byte
	for i := uint64(0); i < iv; i++ {
		if pkt, err = out.Seal(make([]byte, len(inner)+packet.Overhead), packet.NextIPv4, inner); err != nil {
			t.Fatal(err)
		}
	}
	return pkt
}

// TestThreeEntriesServeTenThousandSAs: a key table of 3 entries serves
// 10,000 SAs, all live at once, received concurrently and in any order.
func TestThreeEntriesServeTenThousandSAs(t *testing.T) {
	const sas = 10_000
	w := newWorld(t)
	n := New(3)
	for i, e := range w.entries {
		if err := n.Install(e, w.keys[i][:]); err != nil {
			t.Fatal(err)
		}
	}
	if err := n.Install(sa.Entry{Level: keys.LevelServer, Enclave: 3, Peer: 10, Server: 258, Generation: 1}, make([]byte, 32)); !errors.Is(err, ErrTableFull) {
		t.Fatalf("a fourth key: %v", err)
	}
	pkts := make([][]byte, sas)
	for i := range pkts {
		vc, spi, ck := w.saOf(t, i)
		pkts[i] = seal(t, vc, spi, ck, 1+uint64(i%3), []byte(fmt.Sprintf("SA %d", i)))
	}
	var wg sync.WaitGroup
	const workers = 8
	for wk := 0; wk < workers; wk++ {
		wg.Add(1)
		go func(wk int) {
			defer wg.Done()
			for i := wk; i < sas; i += workers {
				j := (i * 7919) % sas // interleaved across SAs
				got, err := n.Receive(bytes.Clone(pkts[j]))
				if err != nil || string(got) != fmt.Sprintf("SA %d", j) {
					t.Errorf("SA %d: %q, %v", j, got, err)
					return
				}
			}
		}(wk)
	}
	wg.Wait()
	if n.Entries() != 3 || n.Stats().Packets != sas {
		t.Fatalf("table %d entries, %d packets received", n.Entries(), n.Stats().Packets)
	}
	// A packet of an SA under a key the NIC does not hold is refused.
	ek, _ := keys.PairKey(&orgKey, 4, 9, 1)
	sk, _ := keys.ServerKey(&ek, keys.VC{Enclave: 4, Peer: 9, Server: 1})
	ck, _ := keys.SAKeyFromServer(&sk, 0x80000001, keys.PSPv1)
	if _, err := n.Receive(seal(t, keys.VC{Enclave: 4, Peer: 9, Server: 1}, 0x80000001, ck, 1, []byte("x"))); !errors.Is(err, sa.ErrNoKey) {
		t.Fatalf("foreign SA: %v", err)
	}
	if err := n.Install(sa.Entry{Level: keys.LevelOrg, Generation: 1}, orgKey[:]); err == nil {
		t.Fatal("the NIC table took an org key")
	}
}

// TestStatefulFailsAt1001: the conventional table of 1,000 SAs (the
// patent's figure for a NIC) refuses SA 1,001, whose packets then fail.
func TestStatefulFailsAt1001(t *testing.T) {
	w := newWorld(t)
	n := NewStateful(1000)
	for i := 0; i < 1000; i++ {
		_, spi, ck := w.saOf(t, i)
		if err := n.Install(spi, keys.PSPv1, ck.Bytes()); err != nil {
			t.Fatalf("SA %d: %v", i+1, err)
		}
	}
	vc, spi, ck := w.saOf(t, 1000)
	if err := n.Install(spi, keys.PSPv1, ck.Bytes()); !errors.Is(err, ErrTableFull) {
		t.Fatalf("SA 1,001: %v, want ErrTableFull", err)
	}
	if _, err := n.Receive(seal(t, vc, spi, ck, 1, []byte("x"))); !errors.Is(err, ErrUnknownSA) {
		t.Fatalf("packet of SA 1,001: %v", err)
	}
	vc0, spi0, ck0 := w.saOf(t, 0)
	if got, err := n.Receive(seal(t, vc0, spi0, ck0, 1, []byte("first"))); err != nil || string(got) != "first" {
		t.Fatalf("SA 1: %q, %v", got, err)
	}
	// The hierarchical NIC takes the same 1,001 SAs with its 3 entries.
	h := New(3)
	for i, e := range w.entries {
		if err := h.Install(e, w.keys[i][:]); err != nil {
			t.Fatal(err)
		}
	}
	if got, err := h.Receive(seal(t, vc, spi, ck, 1, []byte("x"))); err != nil || string(got) != "x" {
		t.Fatalf("hierarchical NIC, SA 1,001: %q, %v", got, err)
	}
	if n.Entries() != 1000 || n.TableBytes() != 1000*StatefulEntryBytes || h.TableBytes() != 3*HierarchicalEntryBytes {
		t.Fatal("table accounting")
	}
}

// heapAfter measures the live heap after build returns what it built.
func heapAfter(build func() any) uint64 {
	runtime.GC()
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	keep := build()
	runtime.GC()
	runtime.ReadMemStats(&after)
	runtime.KeepAlive(keep)
	if after.HeapAlloc < before.HeapAlloc {
		return 0
	}
	return after.HeapAlloc - before.HeapAlloc
}

// TestMemoryReport prints the memory of both models as the number of SAs
// grows (docs/PERFORMANCE.md): the NIC key memory, and this software's
// measured heap for the same state. The hierarchical side stays constant;
// the stateful side grows with every SA (past 1,000 a real NIC has no room:
// these columns are what it would need).
//
//	go test ./internal/nic -run TestMemoryReport -v
func TestMemoryReport(t *testing.T) {
	counts := []int{1_000, 10_000, 100_000, 1_000_000}
	if testing.Short() {
		counts = counts[:2]
	}
	w := newWorld(t)
	ck := make([]byte, 32)
	t.Logf("| SAs | hierarchical: entries | NIC key memory | Go heap | stateful: entries | NIC key memory | Go heap |")
	t.Logf("|---|---|---|---|---|---|---|")
	var lastStateful uint64
	for _, count := range counts {
		// The hierarchical NIC is small: build 100 and take the average.
		var h *NIC
		hHeap := heapAfter(func() any {
			nics := make([]*NIC, 100)
			for k := range nics {
				nics[k] = New(3)
				for i, e := range w.entries {
					if err := nics[k].Install(e, w.keys[i][:]); err != nil {
						t.Fatal(err)
					}
				}
			}
			h = nics[0]
			return nics
		}) / 100
		var s *StatefulNIC
		sHeap := heapAfter(func() any {
			s = NewStateful(0)
			for i := 0; i < count; i++ {
				ck[0], ck[1], ck[2] = byte(i), byte(i>>8), byte(i>>16)
				if err := s.Install(keys.SPI(0x80000000|uint32(i+1)), keys.PSPv1, ck); err != nil {
					t.Fatal(err)
				}
			}
			return s
		})
		t.Logf("| %d | %d | %d B | %.1f KiB | %d | %d KiB | %d KiB |",
			count, h.Entries(), h.TableBytes(), float64(hHeap)/1024, s.Entries(), s.TableBytes()/1024, sHeap/1024)
		if h.Entries() != 3 || s.Entries() != count {
			t.Fatal("entry counts")
		}
		if hHeap > 64<<10 {
			t.Errorf("hierarchical NIC uses %d bytes of heap; it should not grow with SAs", hHeap)
		}
		if sHeap <= lastStateful {
			t.Errorf("stateful heap did not grow from %d to %d SAs", count/10, count)
		}
		lastStateful = sHeap
	}
}
