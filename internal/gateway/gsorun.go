package gateway

import (
	"encoding/binary"
	"errors"
	"net/netip"

	"github.com/enclavekeys/enclave/internal/packet"
)

// Splitting a segmentation-offloaded run (issue 23). An agent sends runs
// of same-size datagrams as one UDP GSO message; a gateway that takes the
// run whole (a netfilter queue bound with GSO, or a relay reading with
// GRO) gets their payloads back to back, and the kernel does not say
// where one ends. Our datagrams say it themselves: every one starts with
// a PSP header of the run's SPI, and their IVs rise (an SA's counter).
// splitRun finds the segment size from the second header and checks that
// every segment is one of ours; anything else is not a run, and is judged
// datagram by datagram or dropped by the caller, never passed unread.

// errNotRun: the payload is not a run of PSP datagrams of one SA.
var errNotRun = errors.New("gateway: not a run of PSP datagrams of one SA")

// maxRunSegments is the most datagrams a sender's run holds (the
// kernel's UDP_MAX_SEGMENTS); a longer run (a router's receive
// coalescing) is still split, at the cost of growing the worker's list.
const maxRunSegments = 64

// minSegment is the shortest datagram of a run: the PSP overhead alone
// (a keepalive carries no inner packet).
const minSegment = packet.Overhead

// pspHeaderOK reports whether b starts like the PSP header of an Enclave
// data packet (tunnel mode, with the VC), with the given SPI.
func pspHeaderOK(b []byte, spi uint32) bool {
	if len(b) < packet.HeaderLen {
		return false
	}
	return (b[0] == packet.NextIPv4 || b[0] == packet.NextIPv6) && b[1] == 2 && b[2]&0x3f == 2 && b[3]&0x03 == 0x03 &&
		binary.BigEndian.Uint32(b[4:8]) == spi
}

// splitRun splits the payload of a run into its datagrams, appended to
// dst as subslices of b (no copy, no allocation when dst has room), and
// returns them. A run of one datagram is b alone.
func splitRun(b []byte, dst [][]byte) ([][]byte, error) {
	dst, _, err := splitRunHint(b, dst, 0)
	return dst, err
}

// splitRunHint is splitRun trying the segment size hint first (the last
// run's, as a sender's runs mostly have one size): it is taken when the
// datagram there has the next IV, which no later boundary can have, so
// the scan for the size is skipped and the split is the one the scan
// would find. It returns the size used.
func splitRunHint(b []byte, dst [][]byte, hint int) ([][]byte, int, error) {
	if len(b) < minSegment || !pspHeaderOK(b, binary.BigEndian.Uint32(b[4:8])) {
		return dst, 0, errNotRun
	}
	spi := binary.BigEndian.Uint32(b[4:8])
	iv := binary.BigEndian.Uint64(b[8:16])
	size := len(b)
	if hint >= minSegment && hint+minSegment <= len(b) && pspHeaderOK(b[hint:], spi) && binary.BigEndian.Uint64(b[hint+8:hint+16]) == iv+1 {
		size = hint
	} else {
		// The segment size: where the next header of this SA starts,
		// with a higher IV. 12 bytes of SPI and IV found by chance in
		// ciphertext are a 2^-96 event per place.
		for s := minSegment; s+minSegment <= len(b); s++ {
			if pspHeaderOK(b[s:], spi) && binary.BigEndian.Uint64(b[s+8:s+16]) > iv {
				size = s
				break
			}
		}
	}
	for off := 0; off < len(b); off += size {
		seg := b[off:min(off+size, len(b))]
		if len(seg) < minSegment || !pspHeaderOK(seg, spi) {
			return dst, 0, errNotRun
		}
		next := binary.BigEndian.Uint64(seg[8:16])
		if off > 0 && next <= iv {
			return dst, 0, errNotRun
		}
		iv = next
		dst = append(dst, seg)
	}
	return dst, size, nil
}

// onRun judges a run of data packets from src to dst, at w.now: every
// datagram as if it came alone (read, logged, counted, judged by policy),
// and reports the segment size found (hint is tried first) and whether
// every datagram passed, so that the run may pass whole. When one did
// not, the others that passed are counted as collateral: they go down
// with their run (ARCHITECTURE, "Runs through the inline gateway"). A
// payload that is not a run of one SA's PSP datagrams fails unread.
func (g *Gateway) onRun(w *worker, run []byte, hint int, src, dst netip.AddrPort) (size int, ok bool) {
	segs, size, err := splitRunHint(run, w.segs[:0], hint)
	if err != nil {
		g.metrics.run("not_run", 0)
		g.metrics.data("malformed")
		return 0, false
	}
	passed := 0
	for _, d := range segs {
		if g.onData(w, d, src, dst) {
			passed++
		}
	}
	if passed == len(segs) {
		g.metrics.run("passed", len(segs))
		return size, true
	}
	g.metrics.run("dropped", len(segs))
	if passed > 0 {
		g.metrics.dataN("run_collateral", float64(passed))
	}
	return size, false
}
