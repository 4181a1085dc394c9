//go:build !linux

package nfqueue

// Config sets up a queue (see the Linux build).
type Config struct {
	Num      uint16
	MaxLen   uint32
	FailOpen bool
	Batch    int
	GSO      bool
}

// Queue is a netfilter queue; there is none off Linux.
type Queue struct{}

// Open fails: netfilter queues need Linux.
func Open(Config) (*Queue, error) { return nil, ErrUnsupported }

// Num is the queue's number.
func (q *Queue) Num() uint16 { return 0 }

// Malformed counts skipped messages.
func (q *Queue) Malformed() uint64 { return 0 }

// SetGSO fails: netfilter queues need Linux.
func (q *Queue) SetGSO(bool) error { return ErrUnsupported }

// Read fails: netfilter queues need Linux.
func (q *Queue) Read([]Packet) (int, error) { return 0, ErrUnsupported }

// Verdict fails: netfilter queues need Linux.
func (q *Queue) Verdict(uint32, Verdict, []byte) error { return ErrUnsupported }

// VerdictMark fails: netfilter queues need Linux.
func (q *Queue) VerdictMark(uint32, Verdict, uint32) error { return ErrUnsupported }

// VerdictUpTo fails: netfilter queues need Linux.
func (q *Queue) VerdictUpTo(uint32, Verdict) error { return ErrUnsupported }

// Flush fails: netfilter queues need Linux.
func (q *Queue) Flush() error { return ErrUnsupported }

// Close does nothing.
func (q *Queue) Close() error { return nil }
