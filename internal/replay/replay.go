// Package replay is the receive window of an SA (DESIGN §4: at least 2048
// packets), built as RFC 6479 describes: the window is a bitmap kept in a
// ring of 64-bit words, and sliding it forward zeroes the words it enters
// instead of shifting every bit.
package replay

const (
	wordBits  = 64
	ringWords = 64 // a power of two, so a word number reduces with a mask
	// WindowSize is how far behind the highest accepted counter a packet
	// may arrive and still be accepted once. One word of the ring is the
	// one being entered, so the window is a word short of the ring.
	WindowSize = (ringWords - 1) * wordBits // 4032
)

// Filter tracks the counters (IVs) seen on one SA. Counter 0 is never
// valid: Enclave's IVs start at 1. The zero value is ready. A Filter is not
// safe for concurrent use; the SA serialises access to it.
type Filter struct {
	top  uint64 // the highest counter accepted so far
	ring [ringWords]uint64
}

// Reset forgets every counter.
func (f *Filter) Reset() { *f = Filter{} }

// slot is where counter's bit lives: a word of the ring and a mask in it.
func slot(counter uint64) (word int, bit uint64) {
	return int(counter/wordBits) & (ringWords - 1), 1 << (counter % wordBits)
}

// Check reports whether counter would be accepted now, without recording it:
// anything ahead of the window is new; inside it, a counter is new if its
// bit is clear; behind it, or 0, is refused.
func (f *Filter) Check(counter uint64) bool {
	switch {
	case counter == 0:
		return false
	case counter > f.top:
		return true
	case f.top-counter >= WindowSize:
		return false
	}
	w, bit := slot(counter)
	return f.ring[w]&bit == 0
}

// Accept records counter and reports whether it was new: false for 0, a
// counter seen before, or one too far behind the window.
func (f *Filter) Accept(counter uint64) bool {
	if !f.Check(counter) {
		return false
	}
	if counter > f.top {
		f.advance(counter)
	}
	w, bit := slot(counter)
	f.ring[w] |= bit
	return true
}

// advance moves the front of the window to top. Every word from the one
// after the old front's to top's own comes into the window and must start
// empty; a jump of a whole ring or more empties all of it.
func (f *Filter) advance(top uint64) {
	oldWord, newWord := f.top/wordBits, top/wordBits
	if newWord-oldWord >= ringWords {
		clear(f.ring[:])
	} else {
		for w := oldWord + 1; w <= newWord; w++ {
			f.ring[w&(ringWords-1)] = 0
		}
	}
	f.top = top
}
