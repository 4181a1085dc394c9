package gateway

import (
	"bytes"
	"encoding/json"
	"net/netip"
	"testing"
	"time"

	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/registry"
)

// fillFlows records n flows, all on one SA (as a busy client's are).
func fillFlows(ft *flowTable, n int, now time.Time) {
	pair := registry.NewPair(1, 2)
	src, dst := netip.MustParseAddr("100.64.1.2"), netip.MustParseAddr("100.64.2.1")
	var hint flowHint
	for i := range n {
		t := tuple{proto: 6, src: src, dst: dst, srcPort: uint16(i), dstPort: uint16(443 + i>>16)}
		ft.packet(&t, pair, keys.VC{Enclave: 1, Peer: 2, Server: 1}, 0x1234, 100, now, &hint)
	}
}

// BenchmarkFlowTick is the flow table's share of one timer tick with
// 100,000 flows, none idle.
func BenchmarkFlowTick(b *testing.B) {
	ft := newFlowTable(nil, &Policy{}, "gw", new(pairNames))
	now := time.Now()
	fillFlows(ft, 100000, now)
	b.ResetTimer()
	for range b.N {
		ft.expire(now, DefaultFlowIdle)
	}
}

// TestFlowsOfOneSA: a single SA's flows spread over the table's shards,
// so that one busy SA gets the table's whole room (the shard was once
// chosen by SPI alone, and an SA's 16,385th flow went unrecorded).
func TestFlowsOfOneSA(t *testing.T) {
	ft := newFlowTable(nil, &Policy{}, "gw", new(pairNames))
	fillFlows(ft, 50000, time.Now())
	if n := ft.len(); n != 50000 {
		t.Fatalf("%d of 50000 flows of one SA recorded", n)
	}
	for i := range ft.shards {
		if n := len(ft.shards[i].m); n < 50000/flowShards/2 {
			t.Fatalf("shard %d holds %d flows of %d", i, n, 50000)
		}
	}
}

// TestFlowExpiry: the timers write a flow's line once it has been idle
// for the flow-idle time, at most a quarter of it late, however the
// shards are walked; a flow still in use is kept; stopping writes the
// rest.
func TestFlowExpiry(t *testing.T) {
	for _, idle := range []time.Duration{time.Second, 30 * time.Second} {
		var log bytes.Buffer
		ft := newFlowTable(&log, &Policy{}, "gw", new(pairNames))
		t0 := time.Unix(1_800_000_000, 0)
		fillFlows(ft, 1000, t0)
		busy := tuple{proto: 17, src: netip.MustParseAddr("100.64.1.2"), dst: netip.MustParseAddr("100.64.2.1"), srcPort: 5, dstPort: 53}
		var hint flowHint
		ft.packet(&busy, registry.NewPair(1, 2), keys.VC{Enclave: 1, Peer: 2, Server: 1}, 0x99, 60, t0, &hint)
		lines := func() int { return bytes.Count(log.Bytes(), []byte("\n")) }
		// A tick's worth of time at a time until just before idle: none
		// written.
		now := t0
		for ; now.Add(tick).Before(t0.Add(idle)); now = now.Add(tick) {
			ft.expire(now, idle)
			if now.Sub(t0) > idle/2 {
				ft.packet(&busy, registry.NewPair(1, 2), keys.VC{Enclave: 1, Peer: 2, Server: 1}, 0x99, 60, now, &hint)
			}
		}
		if n := lines(); n != 0 {
			t.Fatalf("idle %v: %d lines before any flow was idle", idle, n)
		}
		// From idle on, within idle/4 (and a tick): all 1000, not the busy one.
		for end := t0.Add(idle + idle/4 + tick); now.Before(end); now = now.Add(tick) {
			ft.expire(now, idle)
		}
		if n, left := lines(), ft.len(); n != 1000 || left != 1 {
			t.Fatalf("idle %v: %d lines within a quarter of idle after it, %d flows left; want 1000 and the busy one", idle, n, left)
		}
		ft.flushAll(now)
		if n := lines(); n != 1001 || ft.len() != 0 {
			t.Fatalf("idle %v: stopping left %d lines, %d flows", idle, n, ft.len())
		}
	}
}

// TestFlowHint: a worker's hint finds its last flow again without a
// lookup, and a hint to a flow already written and forgotten counts the
// next packet on a new record, never on the old one (which would be
// lost).
func TestFlowHint(t *testing.T) {
	var log bytes.Buffer
	ft := newFlowTable(&log, &Policy{}, "gw", new(pairNames))
	t0 := time.Unix(1_800_000_000, 0)
	a := tuple{proto: 6, src: netip.MustParseAddr("100.64.1.2"), dst: netip.MustParseAddr("100.64.2.1"), srcPort: 40000, dstPort: 443}
	b := a
	b.srcPort = 40001
	pair, vc := registry.NewPair(1, 2), keys.VC{Enclave: 1, Peer: 2, Server: 1}
	var hint flowHint
	for i := range 5 {
		ft.packet(&a, pair, vc, 0x99, 100, t0, &hint)
		if i == 2 {
			ft.packet(&b, pair, vc, 0x99, 10, t0, &hint) // another flow between
		}
	}
	if hint.f == nil || hint.k.t != a || hint.f.packets != 5 || hint.f.bytes != 500 {
		t.Fatalf("hint %+v", hint)
	}
	ft.flushAll(t0) // both written and forgotten; the hint still points at a's
	ft.packet(&a, pair, vc, 0x99, 7, t0.Add(time.Second), &hint)
	if ft.len() != 1 {
		t.Fatalf("%d flows after a packet on a forgotten flow's hint", ft.len())
	}
	ft.flushAll(t0)
	var got []uint64
	for _, l := range bytes.Split(bytes.TrimSpace(log.Bytes()), []byte("\n")) {
		var r FlowRecord
		if err := json.Unmarshal(l, &r); err != nil {
			t.Fatal(err)
		}
		if r.SrcPort == 40000 {
			got = append(got, r.Bytes)
		}
		if r.Protocol != "tcp" || r.Proto != 6 || r.Duration == "" {
			t.Fatalf("a flow line's protocol and duration: %s", l)
		}
	}
	if len(got) != 2 || got[0] != 500 || got[1] != 7 {
		t.Fatalf("flow a's lines count %v bytes, want [500 7]", got)
	}
}
