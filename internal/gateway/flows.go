package gateway

import (
	"bufio"
	"encoding/json"
	"hash/maphash"
	"io"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/registry"
)

// flowKey is a flow: an inner 5-tuple on one SA direction.
type flowKey struct {
	t   tuple
	spi keys.SPI
}

// flow is a flow's record. Its verdict is the policy's, decided at its
// first packet and again at its first packet after the policy is reloaded
// (epoch says under which policy it was decided).
type flow struct {
	pair        registry.Pair
	vc          keys.VC
	verdict     Verdict
	epoch       uint64
	packets     uint64
	bytes       uint64
	first, last time.Time
	// gone: written and forgotten (a worker's hint may still point here).
	gone bool
}

// flowHint is a worker's last flow: the datagrams of a run are mostly of
// one flow, and the next is found without hashing its key.
type flowHint struct {
	k  flowKey
	f  *flow
	sh *flowShard
}

// FlowRecord is one line of the flow log (JSON).
type FlowRecord struct {
	// Gateway is the gateway that read the flow.
	Gateway string `json:"gateway,omitempty"`
	// Protocol is the IP protocol's name (tcp, udp, icmp, icmpv6; else
	// its number), Proto its number.
	Protocol string    `json:"protocol"`
	Proto    uint8     `json:"proto"`
	Src      string    `json:"src"`
	Dst      string    `json:"dst"`
	SrcPort  uint16    `json:"src_port"`
	DstPort  uint16    `json:"dst_port"`
	Pair     string    `json:"pair"`
	Server   uint32    `json:"server"`
	VC       string    `json:"vc"`
	SPI      string    `json:"spi"`
	Packets  uint64    `json:"packets"`
	Bytes    uint64    `json:"bytes"`
	First    time.Time `json:"first"`
	Last     time.Time `json:"last"`
	// Duration is Last less First, as "1m2.5s", and DurationMS in
	// milliseconds.
	Duration   string `json:"duration"`
	DurationMS int64  `json:"duration_ms"`
	Verdict    string `json:"verdict"`
}

// flowShards spread the flows over locks, so that several queues on
// several cores rarely wait for one another.
const flowShards = 16

type flowShard struct {
	mu sync.Mutex
	m  map[flowKey]*flow
}

// flowTable holds the flows seen, writes each one's line to the flow log
// when it has been idle (or the gateway stops), and counts them.
type flowTable struct {
	shards [flowShards]flowShard
	// seed keys the hash that picks a flow's shard: every flow, even
	// all of one SA's, may land on any shard, and no sender can aim its
	// flows at one.
	seed maphash.Seed
	next int // the shard expire looks at next (the timers' goroutine only)
	// policy is the policy in force and its epoch (one more at each
	// reload), swapped whole so that a packet reads a consistent pair.
	policy atomic.Pointer[policyEpoch]
	logMu  sync.Mutex
	log    *bufio.Writer
	enc    *json.Encoder
	name   string // the gateway's, on every record (enclave map tells who read)
	names  *pairNames
}

// policyEpoch is a policy and the number of reloads before it.
type policyEpoch struct {
	p     *Policy
	epoch uint64
}

func newFlowTable(w io.Writer, p *Policy, name string, names *pairNames) *flowTable {
	ft := &flowTable{seed: maphash.MakeSeed(), name: name, names: names}
	ft.policy.Store(&policyEpoch{p: p})
	for i := range ft.shards {
		ft.shards[i].m = map[flowKey]*flow{}
	}
	if w != nil {
		ft.log = bufio.NewWriter(w)
		ft.enc = json.NewEncoder(ft.log)
	}
	return ft
}

// packet counts an inner packet of n bytes on its flow and returns the
// flow's verdict; hint is the caller's last flow, and becomes this one.
// Only a new flow allocates.
func (ft *flowTable) packet(t *tuple, pair registry.Pair, vc keys.VC, spi keys.SPI, n int, now time.Time, hint *flowHint) Verdict {
	k := flowKey{*t, spi}
	pe := ft.policy.Load()
	var f *flow
	sh := hint.sh
	if hint.f != nil && hint.k == k {
		sh.mu.Lock()
		if !hint.f.gone {
			f = hint.f
		}
	} else {
		sh = &ft.shards[maphash.Comparable(ft.seed, k)%flowShards]
		sh.mu.Lock()
	}
	hint.f = nil
	if f == nil {
		f = sh.m[k]
	}
	if f == nil {
		v := pe.p.decide(t, pair)
		if len(sh.m) >= maxFlows/flowShards {
			sh.mu.Unlock()
			return v // judged, not recorded
		}
		f = &flow{pair: pair, vc: vc, verdict: v, epoch: pe.epoch, first: now}
		sh.m[k] = f
	} else if f.epoch != pe.epoch { // the policy was reloaded: judge again
		f.verdict, f.epoch = pe.p.decide(t, pair), pe.epoch
	}
	f.packets++
	f.bytes += uint64(n)
	f.last = now
	v := f.verdict
	sh.mu.Unlock()
	hint.k, hint.f, hint.sh = k, f, sh
	return v
}

// setPolicy puts p in force: new flows are judged by it at once, and each
// flow recorded is judged again at its next packet (a flow a new rule
// denies is cut, one it allows goes on; no flow's record is lost).
func (ft *flowTable) setPolicy(p *Policy) {
	for {
		old := ft.policy.Load()
		if ft.policy.CompareAndSwap(old, &policyEpoch{p: p, epoch: old.epoch + 1}) {
			return
		}
	}
}

// PairRead is what a gateway read of one pair: the bytes of its flows and
// the last packet's time.
type PairRead struct {
	Bytes uint64    `json:"bytes"`
	Last  time.Time `json:"last"`
}

// reads sums the live flows by pair (the flows that ended are in the flow
// log).
func (ft *flowTable) reads() map[string]PairRead {
	out := map[string]PairRead{}
	for i := range ft.shards {
		sh := &ft.shards[i]
		sh.mu.Lock()
		for _, f := range sh.m {
			r := out[ft.names.of(f.pair)]
			r.Bytes += f.bytes
			if f.last.After(r.Last) {
				r.Last = f.last.UTC()
			}
			out[ft.names.of(f.pair)] = r
		}
		sh.mu.Unlock()
	}
	return out
}

func (ft *flowTable) len() int {
	n := 0
	for i := range ft.shards {
		sh := &ft.shards[i]
		sh.mu.Lock()
		n += len(sh.m)
		sh.mu.Unlock()
	}
	return n
}

// expire writes and forgets the flows idle for longer than idle. Called
// every tick, it looks at a few shards in turn, not at all of them: every
// flow is looked at within a quarter of idle (a tick that walked 100,000
// flows took 10 ms), so a flow's line comes at most idle/4 late.
func (ft *flowTable) expire(now time.Time, idle time.Duration) {
	n := min(max(int((flowShards*4*tick+idle-1)/idle), 1), flowShards)
	for range n {
		sh := &ft.shards[ft.next]
		ft.next = (ft.next + 1) % flowShards
		ft.write(sh.sweep(ft, nil, func(f *flow) bool { return now.Sub(f.last) >= idle }))
	}
}

// flushAll writes every flow (the gateway is stopping).
func (ft *flowTable) flushAll(time.Time) {
	var out []FlowRecord
	for i := range ft.shards {
		out = ft.shards[i].sweep(ft, out, func(*flow) bool { return true })
	}
	ft.write(out)
}

// sweep appends the records of the flows done says are over to out and
// forgets them.
func (sh *flowShard) sweep(ft *flowTable, out []FlowRecord, done func(*flow) bool) []FlowRecord {
	sh.mu.Lock()
	defer sh.mu.Unlock()
	for k, f := range sh.m {
		if done(f) {
			out = append(out, ft.record(k, f))
			f.gone = true
			delete(sh.m, k)
		}
	}
	return out
}

// write adds records to the flow log.
func (ft *flowTable) write(out []FlowRecord) {
	if ft.enc == nil || len(out) == 0 {
		return
	}
	ft.logMu.Lock()
	defer ft.logMu.Unlock()
	for i := range out {
		out[i].Gateway = ft.name
		ft.enc.Encode(&out[i])
	}
	ft.log.Flush()
}

func (ft *flowTable) record(k flowKey, f *flow) FlowRecord {
	d := f.last.Sub(f.first)
	return FlowRecord{
		Protocol: protocolName(k.t.proto), Duration: d.Round(time.Millisecond).String(), DurationMS: d.Milliseconds(),
		Proto: k.t.proto, Src: k.t.src.String(), Dst: k.t.dst.String(), SrcPort: k.t.srcPort, DstPort: k.t.dstPort,
		Pair: ft.names.of(f.pair), Server: uint32(f.vc.Server), VC: f.vc.String(), SPI: k.spi.String(),
		Packets: f.packets, Bytes: f.bytes, First: f.first.UTC(), Last: f.last.UTC(), Verdict: f.verdict.String(),
	}
}

// protocolName names an IP protocol as policies do, or gives its number.
func protocolName(p uint8) string {
	switch p {
	case protoTCP:
		return "tcp"
	case protoUDP:
		return "udp"
	case protoICMP:
		return "icmp"
	case protoICMPv6:
		return "icmpv6"
	}
	return strconv.Itoa(int(p))
}
