package sa

import (
	"sync/atomic"

	"github.com/enclavekeys/enclave/internal/fastaes"
	"github.com/enclavekeys/enclave/internal/keys"
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
	aead       fastaes.GCM
}

type cacheSet struct {
	ways [cacheWays]atomic.Pointer[cacheEntry]
	hand atomic.Uint32
}

// Cache is a bounded cache of prepared SA keys (AES-GCM states) in front of
// the derivation, safe for concurrent use. It is set-associative with CLOCK
// replacement inside each set. A hit takes no lock and allocates nothing; a
// miss allocates one entry (the key state is published immutably, so a
// reader still using an evicted entry is never disturbed). Entries from an
// older version of the key table are never used.
type Cache struct {
	sets []cacheSet
	mask uint64
	hits, misses atomic.Uint64
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

// Hits and Misses count lookups.
func (c *Cache) Hits() uint64 { return c.hits.Load() }

// Misses counts lookups that had to derive.
func (c *Cache) Misses() uint64 { return c.misses.Load() }

func (c *Cache) set(id *saID) *cacheSet {
	h := uint64(id.spi)<<32 | uint64(id.vc.Server)
	h ^= uint64(id.vc.Enclave)<<48 | uint64(id.vc.Peer)<<32 | uint64(id.version)<<8
	h *= 0x9e3779b97f4a7c15
	h ^= h >> 29
	return &c.sets[h&c.mask]
}

// get returns the cached key state for id at epoch, or nil.
func (c *Cache) get(id saID, epoch uint64) *fastaes.GCM {
	s := c.set(&id)
	for i := range s.ways {
		e := s.ways[i].Load()
		if e != nil && e.id == id && e.epoch == epoch {
			if !e.referenced.Load() {
				e.referenced.Store(true)
			}
			c.hits.Add(1)
			return &e.aead
		}
	}
	c.misses.Add(1)
	return nil
}

// put publishes e, evicting by CLOCK within its set: the hand passes over
// referenced entries once (clearing their bit) and takes the first empty,
// stale or unreferenced way.
func (c *Cache) put(e *cacheEntry) {
	s := c.set(&e.id)
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
