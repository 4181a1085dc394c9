package agent

import (
	"container/heap"
	"time"
)

// deadlines is a min-heap of SAs ordered by when the timers must next look
// at each: its end, its idle limit (server side) or its rekey time
// (client side). A tick looks at the SAs that are due, not at every SA:
// walking 100,000 SAs under the agent's lock took 17 ms every tick.
//
// A due time may be early (a packet arrived since, moving the idle limit
// on); the tick then looks again and schedules the SA anew. It is never
// late: whatever makes an SA end sooner (promote's drain) moves its due
// time forward at once.
type deadlines []*conn

func (d deadlines) Len() int           { return len(d) }
func (d deadlines) Less(i, j int) bool { return d[i].due < d[j].due }
func (d deadlines) Swap(i, j int) {
	d[i], d[j] = d[j], d[i]
	d[i].slot, d[j].slot = i+1, j+1
}

// Push and Pop are for container/heap only.
func (d *deadlines) Push(x any) {
	c := x.(*conn)
	c.slot = len(*d) + 1
	*d = append(*d, c)
}

// Pop is for container/heap only.
func (d *deadlines) Pop() any {
	old := *d
	c := old[len(old)-1]
	old[len(old)-1] = nil
	*d = old[:len(old)-1]
	c.slot = 0
	return c
}

// schedule sets when the timers next look at c (Unix ns).
func (t *tables) schedule(c *conn, at int64) {
	c.due = at
	if c.slot == 0 {
		heap.Push(&t.due, c)
		return
	}
	heap.Fix(&t.due, c.slot-1)
}

// unschedule takes c out of the deadlines.
func (t *tables) unschedule(c *conn) {
	if c.slot != 0 {
		heap.Remove(&t.due, c.slot-1)
	}
}

// next is when the timers must look at c next (Unix ns; now or before if
// it is due now): its end; on the server side, the moment it has been
// idle for too long; on the client side, its rekey time, and then every
// tick until it ends, as a rekey that failed is tried again and an SA
// that becomes the route again gets its rekey (a client has a few SAs,
// not thousands).
func (t *tables) next(c *conn, now time.Time) int64 {
	at := c.expires.UnixNano()
	if c.server && t.idle > 0 {
		// Idle once lastSeen (Unix ms) < now - idle, in ms.
		at = min(at, (c.lastSeen.Load()+t.idle.Milliseconds()+1)*int64(time.Millisecond))
	}
	if !c.server {
		at = min(at, max(c.expires.Add(-t.rekeyBefore).UnixNano(), now.UnixNano()))
		if c.retryAt != 0 {
			at = min(at, max(c.retryAt, now.UnixNano()))
		}
	}
	return at
}
