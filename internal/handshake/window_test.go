package handshake

import (
	"math/rand/v2"
	"testing"
)

// TestWindow64 against a model: a counter is accepted once, if it is not
// 0 and not 64 or more behind the highest accepted.
func TestWindow64(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for run := 0; run < 200; run++ {
		var w window64
		seen := map[uint64]bool{}
		var top uint64
		for i := 0; i < 500; i++ {
			n := top + uint64(r.IntN(80)) - 40
			if r.IntN(10) == 0 {
				n = top + uint64(r.IntN(200))
			}
			if n > top+1000 { // wrapped below zero
				n = uint64(r.IntN(3))
			}
			want := n != 0 && !seen[n] && (n > top || top-n < 64)
			if got := w.accept(n); got != want {
				t.Fatalf("run %d step %d: accept(%d) = %v, want %v (top %d)", run, i, n, got, want, top)
			}
			if want {
				seen[n] = true
				top = max(top, n)
			}
		}
	}
}
