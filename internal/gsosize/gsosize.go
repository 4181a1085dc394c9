// Package gsosize tells an inline gateway the segment size of a
// segmentation-offloaded run it takes whole from a netfilter queue
// (DESIGN §8c). The kernel cuts such a run after the verdict at its own
// gso_size, which nfnetlink_queue does not report; guessing the size from
// the run's bytes is unsound, since whoever holds an SA's key can make
// its bytes show any boundaries. So a small program of ours, run by the
// kernel at every interface's ingress (tcx), copies the gso_size of a
// UDP run to or from the data port into the packet's mark, where the
// queue reads it: Tag in the high 16 bits, the size in the low 16. The
// gateway clears the mark again with its verdict.
//
// The program never overwrites a mark (it writes only where the mark is
// 0, as it is for every packet arriving from a wire or another network
// namespace), and marks nothing but runs of the data port. A run whose
// mark is not the gateway's (a rule marked it before the queue, or it
// arrived on an interface the program was not on yet) has no known size:
// the gateway drops it.
package gsosize

import "errors"

// Tag is the high half of a mark that carries a run's segment size.
const Tag = 0xE5C0

// Mark is the mark the program writes for a run of segment size size.
func Mark(size int) uint32 { return Tag<<16 | uint32(size)&0xffff }

// Size reads a run's segment size from its mark, and reports whether the
// mark carried one.
func Size(mark uint32) (int, bool) {
	if mark>>16 != Tag || mark&0xffff == 0 {
		return 0, false
	}
	return int(mark & 0xffff), true
}

// ErrUnsupported: this system cannot run the program (not Linux, no BPF,
// no tcx, or not privileged); the error wrapping it says why.
var ErrUnsupported = errors.New("gsosize: the run-size program cannot run here (it needs Linux 6.6 or later and CAP_BPF with CAP_NET_ADMIN)")
