package agent

import (
	"errors"
	"net"
	"net/netip"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// batcher reads and writes UDP datagrams on the data port in batches, one
// system call (recvmmsg, sendmmsg) per batch instead of one per packet:
// per-packet system calls are most of the cost of a tunnel on a TUN device.
// Its headers, vectors and addresses are allocated once, so a batch costs
// no allocation. One batcher serves one goroutine.
type batcher struct {
	rc    syscall.RawConn
	v4    bool // the socket is IPv4: sockaddr_in, else sockaddr_in6
	hdrs  []unix.Mmsghdr
	iovs  []unix.Iovec
	names []unix.RawSockaddrInet6 // room for either family

	// The system call's arguments and results, and the functions the
	// netpoller calls, bound once: a closure per call would allocate.
	first, count int
	done         uintptr
	errno        syscall.Errno
	recv, send   func(fd uintptr) bool
}

func newBatcher(c *net.UDPConn, n int) (*batcher, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return nil, err
	}
	// The socket's own family, not the listen address's: Go listens on a
	// wildcard IPv4 address with a dual-stack IPv6 socket.
	domain, serr := 0, error(nil)
	if err := rc.Control(func(fd uintptr) { domain, serr = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_DOMAIN) }); err != nil {
		return nil, err
	}
	if serr != nil {
		return nil, serr
	}
	b := &batcher{rc: rc, v4: domain == unix.AF_INET, hdrs: make([]unix.Mmsghdr, n), iovs: make([]unix.Iovec, n), names: make([]unix.RawSockaddrInet6, n)}
	b.recv, b.send = b.recvmmsg, b.sendmmsg
	for i := range b.hdrs {
		b.hdrs[i].Hdr.Iov = &b.iovs[i]
		b.hdrs[i].Hdr.Iovlen = 1
		b.hdrs[i].Hdr.Name = (*byte)(unsafe.Pointer(&b.names[i]))
	}
	return b, nil
}

// read receives up to len(bufs) datagrams into bufs, and their lengths and
// sources into sizes and srcs. It blocks (in the netpoller) until at least
// one arrives.
func (b *batcher) read(bufs [][]byte, sizes []int, srcs []netip.AddrPort) (int, error) {
	m := min(len(bufs), len(b.hdrs))
	for i := 0; i < m; i++ {
		b.iovs[i].Base = &bufs[i][0]
		b.iovs[i].SetLen(len(bufs[i]))
		b.hdrs[i].Hdr.Namelen = uint32(unsafe.Sizeof(b.names[i]))
		b.hdrs[i].Hdr.Flags = 0
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
	}
	return n, nil
}

func (b *batcher) recvmmsg(fd uintptr) bool {
	return b.mmsg(unix.SYS_RECVMMSG, fd)
}

func (b *batcher) sendmmsg(fd uintptr) bool {
	return b.mmsg(unix.SYS_SENDMMSG, fd)
}

// mmsg makes the system call on hdrs[first:first+count] without blocking,
// and tells the netpoller to wait and call again if the socket is not
// ready.
func (b *batcher) mmsg(trap, fd uintptr) bool {
	b.done, _, b.errno = unix.Syscall6(trap, fd, uintptr(unsafe.Pointer(&b.hdrs[b.first])), uintptr(b.count), unix.MSG_DONTWAIT, 0, 0)
	return b.errno != unix.EAGAIN
}

// source decodes message i's source address.
func (b *batcher) source(i int) netip.AddrPort {
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

// errFamily: a destination of the other address family than the socket.
var errFamily = errors.New("agent: destination of another address family than the data port")

// write sends the datagrams bufs[i] to dsts[i]. It returns how many the
// kernel took and the error that stopped the rest, if any; a destination
// the socket cannot reach (an IPv6 peer on an IPv4 port) is skipped and
// reported as errFamily.
func (b *batcher) write(bufs [][]byte, dsts []netip.AddrPort) (int, error) {
	m, skipped := 0, false
	for i := 0; i < len(bufs) && m < len(b.hdrs); i++ {
		if err := b.setName(m, dsts[i]); err != nil {
			skipped = true
			continue
		}
		b.iovs[m].Base = &bufs[i][0]
		b.iovs[m].SetLen(len(bufs[i]))
		m++
	}
	// A message the kernel refuses (EMSGSIZE, ENOBUFS, a firewall's EPERM)
	// is skipped so that the rest of the batch still goes.
	next, failed := 0, 0
	var last error
	for next < m {
		b.first, b.count = next, m-next
		if err := b.rc.Write(b.send); err != nil { // the socket is closed
			return next - failed, err
		}
		if b.errno != 0 {
			next++
			failed++
			last = b.errno
			continue
		}
		next += int(b.done)
	}
	if skipped {
		last = errors.Join(last, errFamily) // allocates, on a failure only
	}
	return m - failed, last
}

func (b *batcher) setName(i int, ap netip.AddrPort) error {
	sa := &b.names[i]
	port := ap.Port()
	if b.v4 {
		if !ap.Addr().Is4() {
			return errFamily
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
