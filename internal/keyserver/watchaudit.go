package keyserver

import (
	"fmt"
	"sync"
	"time"

	"google.golang.org/grpc/codes"

	"github.com/enclavekeys/enclave/internal/audit"
	"github.com/enclavekeys/enclave/internal/ca"
)

// Watch streams opened are audited in summaries (issue 36): a fleet's
// reconnect after a key-service restart opens thousands at once, and one
// synced entry each would cost as many disk syncs. Each summary names
// every device that opened one (audit.Entry.Opened: caller identity and
// the time), written every opensInterval and when the service stops; a
// crash loses at most the last interval's names. A stream is refused, as
// before, while the audit log takes no entries.

// opensInterval is how often the opens are written.
const opensInterval = time.Second

// maxOpenedPerEntry and maxOpenedBytes keep a summary well within
// audit.MaxLine, whatever the names' lengths.
const (
	maxOpenedPerEntry = 100
	maxOpenedBytes    = 8 << 10
)

// openLog gathers the watch streams opened since the last summary.
type openLog struct {
	mu     sync.Mutex
	opened []string
	since  time.Time
	closed bool // the last summary was written: no stream opens after it
}

// noteWatchOpen records that c opened a watch stream, or refuses it
// while the audit log takes no entries (nothing unaudited is served).
func (s *Service) noteWatchOpen(c *caller) error {
	if err := s.auditHealthy(); err != nil {
		return s.refuse(c, "WatchGenerations", codes.Unavailable, "audit log unavailable; nothing issued")
	}
	now := s.clock.Now()
	who := c.id.String()
	if c.source != "" {
		who += " from " + c.source
	}
	s.opens.mu.Lock()
	if s.opens.closed {
		s.opens.mu.Unlock()
		return s.refuse(c, "WatchGenerations", codes.Unavailable, "the key server is stopping")
	}
	if len(s.opens.opened) == 0 {
		s.opens.since = now
	}
	s.opens.opened = append(s.opens.opened, who+" at "+now.UTC().Format("15:04:05.000"))
	s.opens.mu.Unlock()
	return nil
}

// flushWatchOpens writes the summaries of the streams opened since the
// last; last is the service's final one (streams opened after it are
// refused). Names a write failed for wait for the next.
func (s *Service) flushWatchOpens(last bool) {
	s.opens.mu.Lock()
	opened, since := s.opens.opened, s.opens.since
	s.opens.opened = nil
	s.opens.closed = s.opens.closed || last
	s.opens.mu.Unlock()
	for len(opened) > 0 {
		n, size := 0, 0
		for n < len(opened) && n < maxOpenedPerEntry && (n == 0 || size+len(opened[n]) <= maxOpenedBytes) {
			size += len(opened[n])
			n++
		}
		e := audit.Entry{Caller: "keyserver", Role: string(ca.RoleKeyserver), RPC: "WatchGenerations", Decision: audit.Allow,
			Reason: fmt.Sprintf("watch streams opened since %s: %d (nothing issued: watching generations)", since.UTC().Format(time.RFC3339), n),
			Opened: opened[:n]}
		if err := s.audit.Append(boundEntry(e)); err != nil {
			s.log.Error("audit write failed", "rpc", "WatchGenerations", "err", err, "opened", len(opened))
			s.opens.mu.Lock() // kept for the next try
			s.opens.opened = append(opened, s.opens.opened...)
			s.opens.mu.Unlock()
			return
		}
		opened = opened[n:]
	}
}
