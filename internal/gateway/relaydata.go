package gateway

import (
	"errors"
	"net"
	"net/netip"

	"github.com/enclavekeys/enclave/internal/batch"
	"github.com/enclavekeys/enclave/internal/control"
)

// The relay's data path, in batches and runs. An agent sends its framed
// data datagrams of one size as one offloaded run, and the relay's
// socket takes it whole (UDP receive coalescing): each datagram of it is
// unframed and judged by the core as if it came alone, and those that
// pass go on from the agent's upstream socket as runs again, one per
// destination. Answers come back the same way. Nothing is judged by the
// run: a datagram that fails is dropped alone, and its run's others go
// on, as the relay sends what it forwards itself.

// relayMessages is how many messages (each a datagram or a run) the
// downstream reader takes per system call.
const relayMessages = 8

// downstreamData reads the agents' data on the relay's data port and
// sends what passes on to the peers: the messages of one read from one
// agent (mostly all of them) are judged together and written with as few
// system calls as the runs allow.
func (r *relay) downstreamData() {
	w, m := newWorker(), newMessages(relayMessages)
	w.fromAgent = true
	out, dsts := make([][]byte, 0, relayMessages*batch.MaxSegments), make([]netip.AddrPort, 0, relayMessages*batch.MaxSegments)
	for {
		n, ok := m.read(r.dataIn)
		if !ok {
			return
		}
		w.now = r.g.cfg.Now()
		for i := 0; i < n; {
			_, _, src := m.message(i)
			out, dsts = out[:0], dsts[:0]
			for ; i < n; i++ {
				msg, seg, from := m.message(i)
				if from != src {
					break
				}
				out, dsts = r.judgeDown(w, msg, seg, src, out, dsts)
			}
			if len(out) == 0 {
				continue
			}
			u, err := r.upstream(src, true)
			if err != nil {
				r.g.metrics.dataN("relay_refused", float64(len(out)))
				continue
			}
			r.write(u.dataOut, out, dsts)
		}
	}
}

// write sends datagrams in batches the Conn takes, counting those the
// kernel refused.
func (r *relay) write(c *batch.Conn, out [][]byte, dsts []netip.AddrPort) {
	for len(out) > 0 {
		k := min(len(out), batch.MaxSegments)
		if sent, err := c.Write(out[:k], dsts[:k]); err != nil {
			r.g.metrics.dataN("failed", float64(k-sent))
		}
		out, dsts = out[k:], dsts[k:]
	}
}

// judgeDown unframes and judges the datagrams of one message from an
// agent (a run of seg bytes each), and appends those that pass, unframed,
// and their destinations to out and dsts.
func (r *relay) judgeDown(w *worker, msg []byte, seg int, src netip.AddrPort, out [][]byte, dsts []netip.AddrPort) ([][]byte, []netip.AddrPort) {
	count, passed := 0, 0
	for off := 0; off < len(msg); off += seg {
		d := msg[off:min(off+seg, len(msg))]
		count++
		dst, hl, ok := r.destination(d)
		if !ok {
			continue
		}
		if !r.g.onData(w, d[hl:], src, dst) {
			continue
		}
		passed++
		if len(out) == cap(out) {
			continue // more datagrams than a run holds: never from an agent
		}
		out, dsts = append(out, d[hl:]), append(dsts, dst)
	}
	r.countRun(count, passed)
	return out, dsts
}

// countRun counts a run the relay took whole.
func (r *relay) countRun(count, passed int) {
	switch {
	case count < 2:
	case passed == count:
		r.g.metrics.run("passed", count)
	default:
		r.g.metrics.run("dropped_datagrams", count)
	}
}

// backData reads the answers on an agent's upstream data socket, run by
// run, and sends those that pass to the agent framed with their origin,
// as runs.
func (r *relay) backData(u *upstream) {
	down, err := batch.New(r.data, batch.MaxSegments)
	if err != nil {
		r.g.log.Error("relay data port", "err", err)
		return
	}
	w, m := newWorker(), newMessages(1)
	arena := make([]byte, 0, 65535+batch.MaxSegments*control.MaxRelayHeader)
	out, dsts := make([][]byte, 0, batch.MaxSegments), make([]netip.AddrPort, batch.MaxSegments)
	for i := range dsts {
		dsts[i] = u.client
	}
	for {
		n, ok := m.read(u.dataIn)
		if !ok {
			return
		}
		if n == 0 {
			continue
		}
		w.now = r.g.cfg.Now()
		msg, seg, src := m.message(0)
		arena, out = arena[:0], out[:0]
		count, passed := 0, 0
		for off := 0; off < len(msg); off += seg {
			d := msg[off:min(off+seg, len(msg))]
			count++
			if !r.g.onData(w, d, src, u.client) {
				continue
			}
			passed++
			if len(out) == cap(out) || len(arena)+control.MaxRelayHeader+len(d) > cap(arena) {
				r.write(down, out, dsts[:len(out)])
				arena, out = arena[:0], out[:0]
			}
			start := len(arena)
			hl, err := control.PutRelayHeader(arena[start:start+control.MaxRelayHeader], src)
			if err != nil {
				continue
			}
			arena = append(arena[:start+hl], d...)
			out = append(out, arena[start:])
		}
		r.countRun(count, passed)
		if passed > 0 {
			u.touch(w.now)
			r.write(down, out, dsts[:len(out)])
		}
	}
}

// messages are a batch reader's buffers and what the last read put there.
type messages struct {
	bufs        [][]byte
	sizes, segs []int
	srcs        []netip.AddrPort
}

func newMessages(n int) *messages {
	m := &messages{bufs: make([][]byte, n), sizes: make([]int, n), segs: make([]int, n), srcs: make([]netip.AddrPort, n)}
	for i := range m.bufs {
		m.bufs[i] = make([]byte, 65535)
	}
	return m
}

// read fills m from in, and reports false when the socket is closed.
func (m *messages) read(in *batch.Conn) (int, bool) {
	for {
		n, err := in.Read(m.bufs, m.sizes, m.segs, m.srcs)
		if err == nil {
			return n, true
		}
		if errors.Is(err, net.ErrClosed) {
			return 0, false
		}
	}
}

// message returns message i of the last read: its bytes, its segment size
// (its length when it is one datagram) and its source.
func (m *messages) message(i int) ([]byte, int, netip.AddrPort) {
	msg, seg := m.bufs[i][:m.sizes[i]], m.segs[i]
	if seg <= 0 {
		seg = len(msg)
	}
	return msg, seg, netip.AddrPortFrom(m.srcs[i].Addr().Unmap(), m.srcs[i].Port())
}
