package batch

import (
	"errors"
	"net"
	"net/netip"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Conn reads and writes a UDP socket's datagrams in batches: one system
// call per batch, runs offloaded where the kernel can. Headers, vectors,
// addresses and control messages are allocated once, so a batch costs no
// allocation. One Conn serves one goroutine; a reader and a writer may
// each have one on the same socket.
type Conn struct {
	rc    syscall.RawConn
	v4    bool // the socket is IPv4: sockaddr_in, else sockaddr_in6
	gso   bool // UDP_SEGMENT works on this socket
	gro   bool // UDP_GRO is on: a message may hold a run of segments
	hdrs  []unix.Mmsghdr
	iovs  []unix.Iovec
	names []unix.RawSockaddrInet6 // room for either family
	ctl   []byte                  // cmsgSpace bytes of control message per message
	// runs[h] is the index of the first datagram of message h and its
	// count, on the write side.
	runs []struct{ first, n int }

	// The system call's arguments and results, and the functions the
	// netpoller calls, bound once: a closure per call would allocate.
	first, count int
	done         uintptr
	errno        syscall.Errno
	recv, send   func(fd uintptr) bool
}

// cmsgSpace holds one UDP_SEGMENT or UDP_GRO control message.
var cmsgSpace = unix.CmsgSpace(4)

// New makes a Conn of up to n datagrams (or runs) per call for c, turning
// on the offloads the kernel has.
func New(c *net.UDPConn, n int) (*Conn, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return nil, err
	}
	// The socket's own family, not the listen address's: Go listens on a
	// wildcard IPv4 address with a dual-stack IPv6 socket.
	domain, serr := 0, error(nil)
	var gso, gro bool
	if err := rc.Control(func(fd uintptr) {
		domain, serr = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_DOMAIN)
		_, e := unix.GetsockoptInt(int(fd), unix.SOL_UDP, unix.UDP_SEGMENT)
		gso = e == nil
		gro = unix.SetsockoptInt(int(fd), unix.SOL_UDP, unix.UDP_GRO, 1) == nil
	}); err != nil {
		return nil, err
	}
	if serr != nil {
		return nil, serr
	}
	b := &Conn{rc: rc, v4: domain == unix.AF_INET, gso: gso, gro: gro,
		hdrs: make([]unix.Mmsghdr, n), iovs: make([]unix.Iovec, n), names: make([]unix.RawSockaddrInet6, n),
		ctl: make([]byte, n*cmsgSpace), runs: make([]struct{ first, n int }, n)}
	b.recv, b.send = b.recvmmsg, b.sendmmsg
	for i := range b.hdrs {
		b.hdrs[i].Hdr.Name = (*byte)(unsafe.Pointer(&b.names[i]))
		b.hdrs[i].Hdr.Control = &b.ctl[i*cmsgSpace]
	}
	return b, nil
}

func (b *Conn) recvmmsg(fd uintptr) bool {
	return b.mmsg(unix.SYS_RECVMMSG, fd)
}

func (b *Conn) sendmmsg(fd uintptr) bool {
	return b.mmsg(unix.SYS_SENDMMSG, fd)
}

// mmsg makes the system call on hdrs[first:first+count] without blocking,
// and tells the netpoller to wait and call again if the socket is not
// ready. It never blocks, so it is a raw system call: the runtime is not
// told, and a send whose forwarding keeps the kernel busy for more than
// 20 µs does not make it hand the processor to another thread and wake
// its monitor.
func (b *Conn) mmsg(trap, fd uintptr) bool {
	b.done, _, b.errno = unix.RawSyscall6(trap, fd, uintptr(unsafe.Pointer(&b.hdrs[b.first])), uintptr(b.count), unix.MSG_DONTWAIT, 0, 0)
	return b.errno != unix.EAGAIN
}

// Read receives up to len(bufs) messages into bufs, and their lengths,
// segment sizes and sources into sizes, segs and srcs. A message with
// segs[i] > 0 and sizes[i] > segs[i] is a run of datagrams of segs[i]
// bytes each (the last may be shorter), coalesced by the kernel. It blocks
// (in the netpoller) until at least one arrives.
func (b *Conn) Read(bufs [][]byte, sizes, segs []int, srcs []netip.AddrPort) (int, error) {
	m := min(len(bufs), len(b.hdrs))
	for i := 0; i < m; i++ {
		b.iovs[i].Base = &bufs[i][0]
		b.iovs[i].SetLen(len(bufs[i]))
		h := &b.hdrs[i].Hdr
		h.Iov, h.Iovlen = &b.iovs[i], 1
		h.Namelen = uint32(unsafe.Sizeof(b.names[i]))
		h.Flags = 0
		h.SetControllen(0)
		if b.gro {
			h.SetControllen(cmsgSpace)
		}
	}
	b.first, b.count = 0, m
	if err := b.rc.Read(b.recv); err != nil {
		return 0, err
	}
	if b.errno != 0 {
		return 0, b.errno
	}
	n := int(b.done)
	for i := 0; i < n; i++ {
		sizes[i] = int(b.hdrs[i].Len)
		srcs[i] = b.source(i)
		segs[i] = b.segment(i)
	}
	return n, nil
}

// segment reads message i's UDP_GRO control message: the size of the
// segments it holds, or 0.
func (b *Conn) segment(i int) int {
	h := &b.hdrs[i].Hdr
	if !b.gro || h.Controllen < uint64(unix.CmsgLen(4)) {
		return 0
	}
	c := (*unix.Cmsghdr)(unsafe.Pointer(h.Control))
	if c.Level != unix.SOL_UDP || c.Type != unix.UDP_GRO || c.Len < uint64(unix.CmsgLen(4)) {
		return 0
	}
	return int(*(*int32)(unsafe.Pointer(&b.ctl[i*cmsgSpace+unix.CmsgLen(0)])))
}

// source decodes message i's source address.
func (b *Conn) source(i int) netip.AddrPort {
	sa := &b.names[i]
	switch sa.Family {
	case unix.AF_INET:
		s4 := (*unix.RawSockaddrInet4)(unsafe.Pointer(sa))
		p := (*[2]byte)(unsafe.Pointer(&s4.Port))
		return netip.AddrPortFrom(netip.AddrFrom4(s4.Addr), uint16(p[0])<<8|uint16(p[1]))
	case unix.AF_INET6:
		p := (*[2]byte)(unsafe.Pointer(&sa.Port))
		return netip.AddrPortFrom(netip.AddrFrom16(sa.Addr).Unmap(), uint16(p[0])<<8|uint16(p[1]))
	}
	return netip.AddrPort{}
}

// ErrFamily: a destination of the other address family than the socket.
var ErrFamily = errors.New("batch: destination of another address family than the socket")

// Write sends the datagrams bufs[i] to dsts[i] (at most n of them):
// consecutive datagrams to
// one peer of one size (the last of a run may be shorter) go as one
// offloaded run. It returns how many datagrams the kernel took and the
// error that stopped the rest, if any; a destination the socket cannot
// reach (an IPv6 peer on an IPv4 port) is skipped and reported as
// ErrFamily, and a message the kernel refuses is skipped so that the rest
// still go.
func (b *Conn) Write(bufs [][]byte, dsts []netip.AddrPort) (int, error) {
	bufs = bufs[:min(len(bufs), len(b.iovs))] // a batch is at most n
	m, iov, skipped := 0, 0, false
	for i := 0; i < len(bufs); {
		if err := b.setName(m, dsts[i]); err != nil {
			skipped = true
			i++
			continue
		}
		// The run: bufs[i:j], all to dsts[i], all of seg bytes but the
		// last, which may be shorter.
		seg, total, j := len(bufs[i]), len(bufs[i]), i+1
		for b.gso && j < len(bufs) && j-i < MaxSegments && dsts[j] == dsts[i] &&
			len(bufs[j]) <= seg && total+len(bufs[j]) <= MaxRun {
			total += len(bufs[j])
			j++
			if len(bufs[j-1]) < seg {
				break
			}
		}
		for k := i; k < j; k++ {
			b.iovs[iov+k-i].Base = &bufs[k][0]
			b.iovs[iov+k-i].SetLen(len(bufs[k]))
		}
		h := &b.hdrs[m].Hdr
		h.Iov, h.Iovlen = &b.iovs[iov], uint64(j-i)
		h.SetControllen(0)
		if j-i > 1 {
			b.setSegment(m, seg)
		}
		b.runs[m].first, b.runs[m].n = i, j-i
		iov += j - i
		m++
		i = j
	}
	next, failed := 0, 0
	var last error
	for next < m {
		b.first, b.count = next, m-next
		if err := b.rc.Write(b.send); err != nil { // the socket is closed
			return b.sent(next) - failed, err
		}
		if b.errno == 0 {
			next += int(b.done)
			continue
		}
		if (b.errno == unix.EINVAL || b.errno == unix.EMSGSIZE) && b.runs[next].n > 1 {
			// A run of datagrams larger than the route's MTU: the kernel
			// cannot cut it, but fragments datagrams sent alone. Send the
			// rest of this batch datagram by datagram; the next batch
			// tries runs again.
			first := b.runs[next].first
			done := b.sent(next) - failed
			b.gso = false
			n, err := b.Write(bufs[first:], dsts[first:])
			b.gso = true
			if skipped {
				err = errors.Join(err, ErrFamily)
			}
			return done + n, errors.Join(last, err)
		}
		if b.errno == unix.EIO && b.runs[next].n > 1 {
			// The route's device cannot checksum a segmented run: send
			// this run and all later ones datagram by datagram.
			b.gso = false
			first := b.runs[next].first
			done := b.sent(next) - failed
			n, err := b.Write(bufs[first:], dsts[first:])
			if skipped {
				err = errors.Join(err, ErrFamily)
			}
			return done + n, errors.Join(last, err)
		}
		failed += b.runs[next].n
		last = b.errno
		next++
	}
	if skipped {
		last = errors.Join(last, ErrFamily) // allocates, on a failure only
	}
	return b.sent(m) - failed, last
}

// sent counts the datagrams in messages [0, h).
func (b *Conn) sent(h int) int {
	n := 0
	for i := 0; i < h; i++ {
		n += b.runs[i].n
	}
	return n
}

// setSegment puts a UDP_SEGMENT control message of seg bytes on message h.
func (b *Conn) setSegment(h, seg int) {
	c := (*unix.Cmsghdr)(unsafe.Pointer(&b.ctl[h*cmsgSpace]))
	c.Level, c.Type = unix.SOL_UDP, unix.UDP_SEGMENT
	c.SetLen(unix.CmsgLen(2))
	*(*uint16)(unsafe.Pointer(&b.ctl[h*cmsgSpace+unix.CmsgLen(0)])) = uint16(seg)
	b.hdrs[h].Hdr.SetControllen(cmsgSpace)
}

func (b *Conn) setName(i int, ap netip.AddrPort) error {
	sa := &b.names[i]
	port := ap.Port()
	if b.v4 {
		if !ap.Addr().Is4() {
			return ErrFamily
		}
		s4 := (*unix.RawSockaddrInet4)(unsafe.Pointer(sa))
		s4.Family = unix.AF_INET
		p := (*[2]byte)(unsafe.Pointer(&s4.Port))
		p[0], p[1] = byte(port>>8), byte(port)
		s4.Addr = ap.Addr().As4()
		b.hdrs[i].Hdr.Namelen = unix.SizeofSockaddrInet4
		return nil
	}
	sa.Family = unix.AF_INET6
	p := (*[2]byte)(unsafe.Pointer(&sa.Port))
	p[0], p[1] = byte(port>>8), byte(port)
	sa.Addr = ap.Addr().As16() // an IPv4 address as IPv4-mapped
	sa.Flowinfo, sa.Scope_id = 0, 0
	b.hdrs[i].Hdr.Namelen = unix.SizeofSockaddrInet6
	return nil
}

// Offloads reports whether the socket sends runs with segmentation
// offload and receives them coalesced.
func (b *Conn) Offloads() (gso, gro bool) { return b.gso, b.gro }
