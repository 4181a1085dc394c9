package keyserver

import "time"

// Clock is the service's time source; tests inject a fake one so that
// rotation needs no sleeping.
type Clock interface {
	Now() time.Time
	// After delivers once after d has passed on this clock.
	After(d time.Duration) <-chan time.Time
}

// SystemClock is the real clock.
type SystemClock struct{}

// Now implements Clock.
func (SystemClock) Now() time.Time { return time.Now() }

// After implements Clock.
func (SystemClock) After(d time.Duration) <-chan time.Time { return time.After(d) }
