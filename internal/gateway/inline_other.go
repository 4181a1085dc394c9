//go:build !linux

package gateway

import "github.com/enclavekeys/enclave/internal/nfqueue"

// queueRunner is one queue's loop.
type queueRunner interface {
	run()
	close()
}

// openQueues fails: the inline gateway needs Linux's netfilter queues.
func openQueues(*Gateway, []uint16, bool) ([]queueRunner, error) { return nil, nfqueue.ErrUnsupported }
