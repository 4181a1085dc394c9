package gateway

import (
	"net/netip"

	"github.com/enclavekeys/enclave/internal/packet"
)

// Judging a segmentation-offloaded run (DESIGN §8c). An agent sends runs
// of same-size datagrams as one UDP GSO message; a gateway that takes the
// run whole (a netfilter queue bound with GSO, or a relay reading with
// GRO) gets their payloads back to back. The kernel cuts the run into
// datagrams at its own segment size, after the verdict on the inline
// gateway and before the relay reads. The bytes of a run cannot tell that
// size: whoever holds an SA's key can make them show PSP headers wherever
// it likes, and so hide a datagram the policy denies between boundaries
// the gateway would have guessed. So a run is only ever cut at the size
// the kernel gives (the run-size program's mark, internal/gsosize, or the
// relay socket's UDP_GRO message), exactly as the kernel will cut it, and
// passes only if every piece would pass alone.

// maxRunSegments is the most datagrams a sender's run holds (the
// kernel's UDP_MAX_SEGMENTS); a longer run (a router's receive
// coalescing) is still cut, at the cost of growing the worker's list.
const maxRunSegments = 64

// cutRun cuts the payload of a run into the datagrams the kernel makes of
// it at segment size size: size bytes each, the last one shorter if the
// length is no multiple of it. They are appended to dst as subslices of b
// (no copy, no allocation when dst has room). A size below 1 is the run
// as one datagram.
func cutRun(b []byte, size int, dst [][]byte) [][]byte {
	if size <= 0 || size >= len(b) {
		return append(dst, b)
	}
	for off := 0; off < len(b); off += size {
		dst = append(dst, b[off:min(off+size, len(b))])
	}
	return dst
}

// onRun judges a run of data packets from src to dst, cut at the
// kernel's segment size, at w.now: every datagram as if it came alone
// (read, logged, counted, judged by policy), and reports whether every
// one passed, so that the run may pass whole. When one did not, the
// others that passed are counted as collateral: they go down with their
// run (ARCHITECTURE, "Runs through the inline gateway").
func (g *Gateway) onRun(w *worker, run []byte, size int, src, dst netip.AddrPort) bool {
	if size > 0 && size < packet.Overhead && len(run) > size {
		// Every piece is shorter than any data packet: no need to look
		// at thousands of them.
		g.metrics.run("dropped", (len(run)+size-1)/size)
		g.metrics.data("malformed")
		return false
	}
	segs := cutRun(run, size, w.segs[:0])
	w.segs = segs[:0]
	passed := 0
	for _, d := range segs {
		if g.onData(w, d, src, dst) {
			passed++
		}
	}
	if passed == len(segs) {
		g.metrics.run("passed", len(segs))
		return true
	}
	g.metrics.run("dropped", len(segs))
	if passed > 0 {
		g.metrics.dataN("run_collateral", float64(passed))
	}
	return false
}
