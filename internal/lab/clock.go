package lab

import (
	"sync"
	"time"
)

// labClock is the key services' clock in the lab: the real time, moved on
// by Advance, so that the rotation schedule (hourly here, daily by
// default) comes due within the lab's minute. Waits (After) end when the
// clock reaches them, advanced or not. Everything else in the lab keeps
// the real time, as the rest of an organisation does while its key
// service's day passes.
type labClock struct {
	mu      sync.Mutex
	offset  time.Duration
	changed chan struct{} // closed and replaced at each Advance
	done    chan struct{} // closed when the lab ends: waits give up
}

func newLabClock() *labClock {
	return &labClock{changed: make(chan struct{}), done: make(chan struct{})}
}

// Now is the real time plus what Advance added.
func (c *labClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return time.Now().Add(c.offset)
}

// After delivers once d has passed on this clock.
func (c *labClock) After(d time.Duration) <-chan time.Time {
	ch := make(chan time.Time, 1)
	target := c.Now().Add(d)
	go func() {
		for {
			c.mu.Lock()
			left, changed := target.Sub(time.Now().Add(c.offset)), c.changed
			c.mu.Unlock()
			if left <= 0 {
				ch <- c.Now()
				return
			}
			t := time.NewTimer(left)
			select {
			case <-t.C:
			case <-changed:
				t.Stop()
			case <-c.done:
				t.Stop()
				return
			}
		}
	}()
	return ch
}

// Advance moves the clock on by d.
func (c *labClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.offset += d
	close(c.changed)
	c.changed = make(chan struct{})
}

// stop ends the waits still pending.
func (c *labClock) stop() { close(c.done) }
