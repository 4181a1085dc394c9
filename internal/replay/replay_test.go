package replay

import (
	"math/rand/v2"
	"testing"
)

func TestWindowAtLeast2048(t *testing.T) {
	if WindowSize < 2048 {
		t.Fatalf("window %d < 2048 (DESIGN §4)", WindowSize)
	}
}

// TestAgainstModel compares the filter with a plain set-based model over
// random arrival orders, duplicates and jumps.
func TestAgainstModel(t *testing.T) {
	r := rand.New(rand.NewPCG(13, 14))
	for round := 0; round < 50; round++ {
		var f Filter
		seen := map[uint64]bool{}
		var last uint64
		for i := 0; i < 20000; i++ {
			var c uint64
			switch r.IntN(10) {
			case 0: // a big jump ahead
				c = last + uint64(r.IntN(3*WindowSize))
			case 1: // an exact replay
				c = last
			case 2: // far behind
				if last > 2*WindowSize {
					c = last - WindowSize - uint64(r.IntN(WindowSize))
				}
			default: // near the front, either side
				c = last + 50 - uint64(r.IntN(min(int(last)+50, WindowSize+100)))
			}
			want := c != 0 && !seen[c] && (c > last || last-c < WindowSize)
			if got := f.Check(c); got != want {
				t.Fatalf("round %d: Check(%d) with last %d = %v, want %v", round, c, last, got, want)
			}
			if got := f.Accept(c); got != want {
				t.Fatalf("round %d: Accept(%d) with last %d = %v, want %v", round, c, last, got, want)
			}
			if want {
				seen[c] = true
				last = max(last, c)
			}
		}
	}
}

func TestEdges(t *testing.T) {
	var f Filter
	if f.Accept(0) || f.Check(0) {
		t.Fatal("counter 0 accepted")
	}
	for c := uint64(1); c <= 5000; c++ {
		if !f.Accept(c) {
			t.Fatalf("in-order %d refused", c)
		}
	}
	if f.Accept(5000) || f.Accept(1) {
		t.Fatal("replay accepted")
	}
	if !f.Accept(1 << 63) {
		t.Fatal("jump refused")
	}
	if f.Accept(5001) {
		t.Fatal("counter far behind the window accepted")
	}
	if !f.Accept(1<<63 - WindowSize + 1) {
		t.Fatal("oldest counter inside the window refused")
	}
	if f.Accept(1<<63 - WindowSize) {
		t.Fatal("counter just outside the window accepted")
	}
	if !f.Accept(^uint64(0)) || f.Accept(^uint64(0)) {
		t.Fatal("max counter")
	}
	f.Reset()
	if !f.Accept(1) {
		t.Fatal("Reset")
	}
}

func FuzzFilter(f *testing.F) {
	f.Add([]byte{1, 2, 3, 1, 200, 0, 255})
	f.Fuzz(func(t *testing.T, steps []byte) {
		var filt Filter
		seen := map[uint64]bool{}
		var c uint64 = 1
		for _, s := range steps {
			// Each byte moves the counter: forward by s, or back by s-128.
			if s < 128 {
				c += uint64(s) * 37
			} else if d := uint64(s-128) * 29; d < c {
				c -= d
			}
			want := c != 0 && !seen[c] && (c > filt.top || filt.top-c < WindowSize)
			if filt.Accept(c) != want {
				t.Fatalf("Accept(%d) != %v", c, want)
			}
			if want {
				seen[c] = true
			}
		}
	})
}

func BenchmarkAccept(b *testing.B) {
	var f Filter
	c := uint64(0)
	for b.Loop() {
		c++
		f.Accept(c)
	}
}
