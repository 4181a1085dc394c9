// Package batch is the batched UDP I/O of the data plane (DESIGN §7):
// agents and the relay gateway read and write datagrams many per system
// call (recvmmsg, sendmmsg) and, where the kernel has them, with UDP
// segmentation offload (a run of same-size datagrams to one destination
// goes down the stack as one) and UDP receive coalescing (a run arrives
// as one, with its segment size). Per packet, the network stack's work is
// most of the cost of a tunnel; these cut it to per batch or per run.
package batch

const (
	// MaxSegments and MaxRun bound one offloaded run: the kernel takes at
	// most 64 segments, and an IP packet's 64 KiB, headers included.
	MaxSegments = 64
	MaxRun      = 65535 - 8 - 40
)
