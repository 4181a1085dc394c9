package sa

import (
	"sync/atomic"

	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/packet"
)

// cacheWays is the associativity of the cache: each SA key may live in one
// of this many places of its set.
const cacheWays = 4

// saID is what an SA key is derived from: with the table's keys fixed
// (same epoch), the same id always gives the same key.
type saID struct {
	vc      keys.VC
	spi     keys.SPI
	version keys.Version
}

// cacheEntry is immutable once published, but for its reference bit.
type cacheEntry struct {
	id         saID
	epoch      uint64
	referenced atomic.Bool
	aead       packet.AEAD
}

type cacheSet struct {
	ways [cacheWays]atomic.Pointer[cacheEntry]
	hand atomic.Uint32
}

// Cache is a bounded cache of prepared SA keys (AES-GCM states) in front of
// the derivation, safe for concurrent use. Each SA may live in any of the
// ways of two sets (two-choice, set-associative), with CLOCK replacement
// inside a set. A hit takes no lock and allocates nothing; a
// miss allocates one entry (the key state is published immutably, so a
// reader still using an evicted entry is never disturbed). Entries from an
// older version of the key table are never used.
type Cache struct {
	sets   []cacheSet
	mask   uint64
	misses atomic.Uint64
}

// NewCache returns a cache of at least size entries (rounded up to a power
// of two times the associativity); size must be positive.
func NewCache(size int) *Cache {
	n := 1
	for n*cacheWays < size {
		n <<= 1
	}
	return &Cache{sets: make([]cacheSet, n), mask: uint64(n - 1)}
}

// Size is the number of entries the cache holds.
func (c *Cache) Size() int { return len(c.sets) * cacheWays }

// Misses counts lookups that had to derive a key (hits are the packets
// that passed, less these).
func (c *Cache) Misses() uint64 { return c.misses.Load() }

// sets2 returns the two sets an id may live in (two-choice hashing: with
// two candidate sets, sets rarely overflow even when half the cache is in
// use, where one set per id would thrash some of them).
func (c *Cache) sets2(id *saID) (*cacheSet, *cacheSet) {
	h := uint64(id.spi)<<32 | uint64(id.vc.Server)
	h ^= (uint64(id.vc.Enclave)<<16 | uint64(id.vc.Peer) | uint64(id.version)<<40) * 0x9e3779b97f4a7c15
	// MurmurHash3's finaliser: every input bit reaches every output bit.
	h ^= h >> 33
	h *= 0xff51afd7ed558ccd
	h ^= h >> 33
	h *= 0xc4ceb9fe1a85ec53
	h ^= h >> 33
	return &c.sets[h&c.mask], &c.sets[(h>>32)&c.mask]
}

// get returns the cached key state for id at epoch, or nil. A hit touches
// no shared counter (only misses are counted), so cores do not contend.
func (c *Cache) get(id saID, epoch uint64) *packet.AEAD {
	s1, s2 := c.sets2(&id)
	for _, s := range [2]*cacheSet{s1, s2} {
		for i := range s.ways {
			e := s.ways[i].Load()
			if e != nil && e.id == id && e.epoch == epoch {
				if !e.referenced.Load() {
					e.referenced.Store(true)
				}
				return &e.aead
			}
		}
	}
	c.misses.Add(1)
	return nil
}

// put publishes e: into an empty or stale way of either of its sets if
// there is one, else by CLOCK within one of them: the hand passes over
// referenced entries once (clearing their bit) and takes the first
// unreferenced way.
func (c *Cache) put(e *cacheEntry) {
	s1, s2 := c.sets2(&e.id)
	for _, s := range [2]*cacheSet{s1, s2} {
		for i := range s.ways {
			old := s.ways[i].Load()
			if (old == nil || old.epoch != e.epoch) && s.ways[i].CompareAndSwap(old, e) {
				return
			}
		}
	}
	s := s1
	if e.id.spi&1 == 1 {
		s = s2
	}
	for range 2 * cacheWays {
		i := s.hand.Add(1) % cacheWays
		old := s.ways[i].Load()
		if old == nil || old.epoch != e.epoch || !old.referenced.Load() {
			if s.ways[i].CompareAndSwap(old, e) {
				return
			}
			continue
		}
		old.referenced.Store(false)
	}
	s.ways[s.hand.Add(1)%cacheWays].Store(e)
}
