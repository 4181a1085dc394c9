package nfqueue

import (
	"errors"
	"fmt"
	"syscall"
	"unsafe"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// Config sets up a queue.
type Config struct {
	// Num is the queue number of the iptables rule (--queue-num, or one
	// of --queue-balance's).
	Num uint16
	// MaxLen is how many packets the kernel holds for this process before
	// it drops them, or with FailOpen accepts them (default 4096).
	MaxLen uint32
	// FailOpen makes the kernel accept packets it cannot queue (the queue
	// is full) instead of dropping them.
	FailOpen bool
	// Batch is how many packets one Read returns at most (default 64).
	Batch int
	// GSO asks for segmentation-offloaded packets whole (NFQA_CFG_F_GSO):
	// a run of datagrams a sender handed the kernel as one comes up as one
	// packet (Packet.GSO), with its checksum perhaps not filled in yet
	// (Packet.ChecksumNotReady), and one verdict decides the run. Without
	// it the kernel cuts every run before it queues it, one packet each.
	GSO bool
}

// Queue is one bound netfilter queue. Read and the verdict calls belong to
// one goroutine; Close may be called from any.
type Queue struct {
	num  uint16
	conn *netlink.Conn
	rc   syscall.RawConn

	bufs [][]byte
	hdrs []unix.Mmsghdr
	iovs []unix.Iovec

	out []byte // verdicts not yet sent

	// rest are the received datagrams' bytes not parsed yet: a datagram
	// may hold several messages, and Read stops when pkts is full.
	rest [][]byte

	// Arguments and results of the system calls, and the functions the
	// netpoller calls, bound once: a closure per call would allocate.
	done  uintptr
	errno syscall.Errno
	count int
	recv  func(fd uintptr) bool
	send  func(fd uintptr) bool

	malformed uint64
}

// bufSize holds one queued packet of the largest size with its netlink
// framing and attributes.
const bufSize = 65535 + 1024

// Open binds queue cfg.Num: the process receives its packets whole. Only
// one process may bind a queue; a second gets the kernel's EBUSY.
func Open(cfg Config) (*Queue, error) {
	if cfg.MaxLen == 0 {
		cfg.MaxLen = 4096
	}
	if cfg.Batch <= 0 {
		cfg.Batch = 64
	}
	c, err := netlink.Dial(unix.NETLINK_NETFILTER, nil)
	if err != nil {
		return nil, fmt.Errorf("nfqueue: netlink socket: %w", err)
	}
	q := &Queue{num: cfg.Num, conn: c}
	fail := func(step string, err error) (*Queue, error) {
		c.Close()
		if errors.Is(err, unix.EPERM) {
			return nil, fmt.Errorf("nfqueue: %s queue %d: %w (needs CAP_NET_ADMIN)", step, cfg.Num, err)
		}
		return nil, fmt.Errorf("nfqueue: %s queue %d: %w", step, cfg.Num, err)
	}
	params := append(be32(0xffff), copyPacket)
	var flags uint32
	if cfg.FailOpen {
		flags |= flagFail
	}
	if cfg.GSO {
		flags |= flagGSO
	}
	steps := []struct {
		name string
		body []byte
	}{
		{"bind", configMessage(cfg.Num, attr(cfgCmd, []byte{cmdBind, 0, 0, 0}))},
		{"copy mode of", configMessage(cfg.Num, attr(cfgParams, params))},
		{"length of", configMessage(cfg.Num, attr(cfgMaxLen, be32(cfg.MaxLen)))},
		{"flags of", configMessage(cfg.Num, attr(cfgFlags, be32(flags)), attr(cfgMask, be32(flagFail|flagGSO)))},
	}
	for _, s := range steps {
		m := netlink.Message{Header: netlink.Header{Type: netlink.HeaderType(msgConfig), Flags: netlink.Request | netlink.Acknowledge}, Data: s.body}
		if _, err := c.Execute(m); err != nil {
			return fail(s.name, err)
		}
	}
	// A burst the reader has not caught up with waits in the socket; an
	// overrun loses packets (counted by the kernel), never the socket.
	_ = c.SetOption(netlink.NoENOBUFS, true)
	_ = c.SetReadBuffer(8 << 20)
	if q.rc, err = c.SyscallConn(); err != nil {
		return fail("socket of", err)
	}
	q.bufs = make([][]byte, cfg.Batch)
	q.hdrs = make([]unix.Mmsghdr, cfg.Batch)
	q.iovs = make([]unix.Iovec, cfg.Batch)
	for i := range q.bufs {
		q.bufs[i] = make([]byte, bufSize)
		q.iovs[i].Base = &q.bufs[i][0]
		q.iovs[i].SetLen(bufSize)
		q.hdrs[i].Hdr.Iov, q.hdrs[i].Hdr.Iovlen = &q.iovs[i], 1
	}
	q.out = make([]byte, 0, 1<<20)
	q.recv, q.send = q.recvmmsg, q.sendmsg
	return q, nil
}

// SetGSO changes whether the queue takes segmentation-offloaded packets
// whole (Config.GSO) or has the kernel cut them before queueing. Call it
// before the first Read.
func (q *Queue) SetGSO(on bool) error {
	var flags uint32
	if on {
		flags = flagGSO
	}
	m := netlink.Message{Header: netlink.Header{Type: netlink.HeaderType(msgConfig), Flags: netlink.Request | netlink.Acknowledge},
		Data: configMessage(q.num, attr(cfgFlags, be32(flags)), attr(cfgMask, be32(flagGSO)))}
	if _, err := q.conn.Execute(m); err != nil {
		return fmt.Errorf("nfqueue: flags of queue %d: %w", q.num, err)
	}
	return nil
}

// Num is the queue's number.
func (q *Queue) Num() uint16 { return q.num }

// Malformed counts messages from the kernel Read skipped.
func (q *Queue) Malformed() uint64 { return q.malformed }

// recvmmsg and sendmsg never block (MSG_DONTWAIT: the netpoller waits),
// so they are raw system calls: the runtime is not told, and a verdict
// whose forwarding keeps the kernel busy for more than 20 µs does not
// make the runtime hand the processor to another thread and wake its
// monitor (about a seventh of the gateway's CPU per byte, measured).
func (q *Queue) recvmmsg(fd uintptr) bool {
	q.done, _, q.errno = unix.RawSyscall6(unix.SYS_RECVMMSG, fd, uintptr(unsafe.Pointer(&q.hdrs[0])), uintptr(q.count), unix.MSG_DONTWAIT, 0, 0)
	return q.errno != unix.EAGAIN
}

func (q *Queue) sendmsg(fd uintptr) bool {
	q.done, _, q.errno = unix.RawSyscall6(unix.SYS_SENDTO, fd, uintptr(unsafe.Pointer(&q.out[0])), uintptr(len(q.out)), unix.MSG_DONTWAIT, 0, 0)
	return q.errno != unix.EAGAIN
}

// Read waits for queued packets and fills pkts with up to len(pkts) of
// them, in the order the kernel queued them. Their payloads are valid
// until the next Read.
func (q *Queue) Read(pkts []Packet) (int, error) {
	if len(pkts) == 0 {
		return 0, nil
	}
	for {
		if len(q.rest) > 0 {
			if n := q.parse(pkts); n > 0 {
				return n, nil
			}
			continue
		}
		q.count = min(len(pkts), len(q.hdrs))
		for i := 0; i < q.count; i++ {
			q.hdrs[i].Hdr.Flags = 0
			q.hdrs[i].Len = 0
		}
		if err := q.rc.Read(q.recv); err != nil {
			return 0, err
		}
		if q.errno != 0 {
			if q.errno == unix.EINTR || q.errno == unix.ENOBUFS {
				continue
			}
			return 0, q.errno
		}
		q.rest = q.rest[:0]
		for i := 0; i < int(q.done); i++ {
			if q.hdrs[i].Hdr.Flags&unix.MSG_TRUNC != 0 {
				q.malformed++ // cut: its packet is judged by nobody, and the kernel's bypass or drop applies
				continue
			}
			q.rest = append(q.rest, q.bufs[i][:q.hdrs[i].Len])
		}
	}
}

// parse takes messages from the datagrams received until pkts is full,
// and returns how many packets it found.
func (q *Queue) parse(pkts []Packet) int {
	n := 0
	for len(q.rest) > 0 && n < len(pkts) {
		b := q.rest[0]
		l, ok := messageLen(b)
		if !ok {
			q.malformed++
			q.rest = q.rest[1:]
			continue
		}
		if err := parsePacket(&pkts[n], b[:l]); err != nil {
			q.malformed++
		} else {
			n++
		}
		if al := (l + 3) &^ 3; al < len(b) {
			q.rest[0] = b[al:]
		} else {
			q.rest = q.rest[1:]
		}
	}
	return n
}

// Verdict queues a verdict for packet id; with payload non-nil the packet
// is accepted with that payload instead of its own (the caller fixes its
// lengths and checksums). Verdicts are sent by Flush, in the order given.
func (q *Queue) Verdict(id uint32, v Verdict, payload []byte) error {
	return q.appendVerdict(id, v, false, payload, noMark)
}

// VerdictMark queues a verdict for packet id that also sets its mark.
func (q *Queue) VerdictMark(id uint32, v Verdict, mark uint32) error {
	return q.appendVerdict(id, v, false, nil, int64(mark))
}

// VerdictUpTo queues one verdict for every packet queued up to and
// including id that has not had one yet: a batch in one message.
func (q *Queue) VerdictUpTo(id uint32, v Verdict) error {
	return q.appendVerdict(id, v, true, nil, noMark)
}

func (q *Queue) appendVerdict(id uint32, v Verdict, batch bool, payload []byte, mark int64) error {
	if len(q.out)+nlmsgHdrLen+nfgenHdrLen+24+len(payload)+4 > cap(q.out) {
		if err := q.Flush(); err != nil {
			return err
		}
	}
	out, err := appendVerdict(q.out, q.num, v, id, batch, payload, mark)
	if err != nil {
		return err
	}
	q.out = out
	return nil
}

// Flush sends the queued verdicts in one datagram.
func (q *Queue) Flush() error {
	if len(q.out) == 0 {
		return nil
	}
	err := q.rc.Write(q.send)
	q.out = q.out[:0]
	if err != nil {
		return err
	}
	if q.errno != 0 {
		return fmt.Errorf("nfqueue: sending verdicts: %w", q.errno)
	}
	return nil
}

// Close unbinds the queue: the kernel drops its packets from now on, or
// accepts them where the rule has --queue-bypass.
func (q *Queue) Close() error { return q.conn.Close() }
