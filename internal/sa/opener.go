package sa

import (
	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/packet"
)

// resolver finds the SA key of a packet from the key table, through the
// cache when there is one.
type resolver struct {
	table *KeyTable
	cache *Cache
}

// lookup returns the table's current state and, when cached, the packet's
// prepared key state (else nil).
func (r *resolver) lookup(id saID) (*tableState, *packet.AEAD) {
	st := r.table.state.Load()
	if r.cache == nil {
		return st, nil
	}
	return st, r.cache.get(id, st.epoch)
}

// derive initialises scratch with the SA key of id, derived from the key of
// st that covers it, and publishes a copy to the cache if there is one.
// Only filling the cache allocates.
func (r *resolver) derive(scratch *packet.AEAD, st *tableState, id saID) error {
	d, err := st.lookup(id.vc, id.spi)
	if err != nil {
		return err
	}
	var ck keys.SAKey
	err = d.SAKey(&ck, id.vc, id.spi, id.version)
	if err == nil {
		err = scratch.Init(id.version, ck.Bytes())
	}
	ck.Zero()
	if err != nil {
		return err
	}
	if r.cache != nil {
		r.cache.put(&cacheEntry{id: id, epoch: st.epoch, aead: *scratch})
	}
	return nil
}

// Opener is the stateless receiver (DESIGN §7): it holds only hierarchy
// keys and opens any packet they cover by deriving the SA key from the
// packet's VC and SPI. It keeps no per-SA state (no replay windows: those
// belong to the endpoint's SAs). It is safe for concurrent use.
type Opener struct {
	r     resolver
	stats packet.Stats
}

// NewOpener returns an Opener over table; with cacheSize > 0 a Cache of that
// many prepared SA keys sits in front of the derivation.
func NewOpener(table *KeyTable, cacheSize int) *Opener {
	o := &Opener{r: resolver{table: table}}
	if cacheSize > 0 {
		o.r.cache = NewCache(cacheSize)
	}
	return o
}

// Open parses pkt into p, derives (or finds) its SA key, authenticates and
// decrypts it in place, and returns the inner packet. Refusals are counted
// by cause: malformed packets, ErrNoKey (no key for this pair or server),
// ErrGeneration (only the other generation parity is held), packet.ErrAuth.
func (o *Opener) Open(p *packet.Parsed, pkt []byte) ([]byte, error) {
	return o.OpenInto(nil, p, pkt)
}

// OpenInto is Open with the inner packet appended to dst instead, leaving
// pkt unchanged; a nil dst means in place, as Open.
func (o *Opener) OpenInto(dst []byte, p *packet.Parsed, pkt []byte) ([]byte, error) {
	inner, err := o.open(dst, p, pkt)
	if err != nil {
		o.stats.Drop(dropCause(err))
		return nil, err
	}
	o.stats.Passed(len(inner))
	return inner, nil
}

func (o *Opener) open(dst []byte, p *packet.Parsed, pkt []byte) ([]byte, error) {
	if err := packet.Parse(p, pkt); err != nil {
		return nil, err
	}
	if dst == nil {
		dst = p.Sealed[:0]
	}
	id := saID{p.VC, p.SPI, p.Version}
	st, g := o.r.lookup(id)
	if g != nil {
		return packet.Open(dst, p, g)
	}
	return o.openDerived(dst, p, st, id)
}

// openDerived is the path without a cached key; its key state lives on the
// stack only here, so a cache hit does not pay for clearing it.
func (o *Opener) openDerived(dst []byte, p *packet.Parsed, st *tableState, id saID) ([]byte, error) {
	var scratch packet.AEAD
	defer scratch.Reset()
	if err := o.r.derive(&scratch, st, id); err != nil {
		return nil, err
	}
	return packet.Open(dst, p, &scratch)
}

// Stats returns the opener's counters.
func (o *Opener) Stats() packet.Snapshot { return o.stats.Snapshot() }

// Cache is the opener's cache, or nil.
func (o *Opener) Cache() *Cache { return o.r.cache }

// Sealer is the stateless sender: it seals packets under SA keys derived
// from the hierarchy keys it holds, as a NIC holding server keys would. The
// caller supplies each packet's header (SPI, IV, VC), so IV counters stay
// with the caller. It is safe for concurrent use.
type Sealer struct {
	r     resolver
	stats packet.Stats
}

// NewSealer returns a Sealer over table, with an optional cache as for
// NewOpener.
func NewSealer(table *KeyTable, cacheSize int) *Sealer {
	s := &Sealer{r: resolver{table: table}}
	if cacheSize > 0 {
		s.r.cache = NewCache(cacheSize)
	}
	return s
}

// Seal writes the packet carrying inner under h into out (see packet.Seal).
func (s *Sealer) Seal(out []byte, h *packet.Header, inner []byte) ([]byte, error) {
	id := saID{h.VC, h.SPI, h.Version}
	st, g := s.r.lookup(id)
	var pkt []byte
	var err error
	if g != nil {
		pkt, err = packet.Seal(out, h, g, inner)
	} else {
		pkt, err = s.sealDerived(out, h, inner, st, id)
	}
	if err != nil {
		s.stats.Drop(dropCause(err))
		return nil, err
	}
	s.stats.Passed(len(inner))
	return pkt, nil
}

func (s *Sealer) sealDerived(out []byte, h *packet.Header, inner []byte, st *tableState, id saID) ([]byte, error) {
	var scratch packet.AEAD
	defer scratch.Reset()
	if err := s.r.derive(&scratch, st, id); err != nil {
		return nil, err
	}
	return packet.Seal(out, h, &scratch, inner)
}
