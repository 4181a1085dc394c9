package keyclient

import (
	"testing"
	"time"
)

// TestSpread: waits spread over the second half of their span, at random.
func TestSpread(t *testing.T) {
	seen := map[time.Duration]bool{}
	for range 200 {
		d := Spread(ReconnectSpread)
		if d < ReconnectSpread/2 || d >= ReconnectSpread {
			t.Fatalf("Spread(%v) = %v", ReconnectSpread, d)
		}
		seen[d] = true
	}
	if len(seen) < 100 {
		t.Fatalf("%d distinct waits of 200: not spread", len(seen))
	}
	if Spread(0) != 0 {
		t.Fatal("Spread(0)")
	}
}
