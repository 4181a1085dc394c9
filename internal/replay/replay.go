// Package replay is the receive window of an SA (DESIGN §4: at least 2048
// packets), a sliding bitmap in the style of RFC 6479: a ring of 64-bit
// blocks, so that moving the window clears whole words instead of shifting
// bits. wireguard-go's replay package works the same way.
package replay

const (
	blockBits  = 64
	ringBlocks = 64 // a power of two
	// WindowSize is how far behind the highest accepted counter a packet
	// may arrive and still be accepted once.
	WindowSize = (ringBlocks - 1) * blockBits // 4032
)

// Filter tracks the counters (IVs) seen on one SA. Counter 0 is never
// valid: Enclave's IVs start at 1. The zero value is ready. A Filter is not
// safe for concurrent use; the SA serialises access to it.
type Filter struct {
	last uint64 // highest accepted counter
	ring [ringBlocks]uint64
}

// Reset forgets every counter.
func (f *Filter) Reset() { *f = Filter{} }

// Check reports whether counter would be accepted now, without recording it.
func (f *Filter) Check(counter uint64) bool {
	if counter == 0 {
		return false
	}
	if counter > f.last {
		return true
	}
	if f.last-counter >= WindowSize {
		return false
	}
	return f.ring[(counter/blockBits)%ringBlocks]&(1<<(counter%blockBits)) == 0
}

// Accept records counter and reports whether it was new: false for 0, a
// counter seen before, or one too far behind the window.
func (f *Filter) Accept(counter uint64) bool {
	if counter == 0 {
		return false
	}
	index := counter / blockBits
	if counter > f.last {
		// Slide forward, clearing the blocks the window enters.
		current := f.last / blockBits
		diff := min(index-current, ringBlocks)
		for i := uint64(1); i <= diff; i++ {
			f.ring[(current+i)%ringBlocks] = 0
		}
		f.last = counter
	} else if f.last-counter >= WindowSize {
		return false
	}
	block := &f.ring[index%ringBlocks]
	bit := uint64(1) << (counter % blockBits)
	if *block&bit != 0 {
		return false
	}
	*block |= bit
	return true
}
