// Package sa holds the security associations of the data plane (DESIGN §4
// and §7): an SA per direction with its key, IV counter and replay window,
// and the stateless receiver (Opener) and sender (Sealer) that hold only
// hierarchy keys and derive each packet's SA key from the packet itself.
package sa

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/packet"
	"github.com/enclavekeys/enclave/internal/replay"
)

// Errors of SAs.
var (
	// ErrIVExhausted: the SA has sent its last IV; it never wraps.
	ErrIVExhausted = errors.New("sa: IV space exhausted; the SA must be replaced")
	// ErrReplay: the packet's IV was seen before or is behind the window.
	ErrReplay = errors.New("sa: replayed or too old packet")
	// ErrWrongSA: the packet's SPI, VC or version is not this SA's.
	ErrWrongSA = errors.New("sa: packet belongs to another SA")
)

// MaxIV is the last IV an SA sends.
const MaxIV = ^uint64(0)

// DefaultRekeyAfter is the IV at which an SA asks for a rekey unless
// configured otherwise: far before exhaustion, so old and new SAs can
// overlap.
const DefaultRekeyAfter = 1 << 62

// Config describes one direction of an SA.
type Config struct {
	SPI     keys.SPI
	VC      keys.VC
	Version keys.Version
	// Key is the SA key CK: 16 bytes for PSPv0, 32 for PSPv1.
	Key []byte
	// RekeyAfter is the IV from which NeedsRekey reports true; 0 means
	// DefaultRekeyAfter.
	RekeyAfter uint64
}

func (c *Config) check() error {
	if !c.SPI.Valid() {
		return packet.ErrSPIIndexZero
	}
	if !c.Version.Valid() {
		return packet.ErrVersion
	}
	if len(c.Key) != c.Version.KeySize() {
		return fmt.Errorf("%w: %d bytes for PSP version %d", packet.ErrKeyLength, len(c.Key), c.Version)
	}
	return nil
}

// Outbound is the sending direction of an SA. It is safe for concurrent use.
type Outbound struct {
	spi        keys.SPI
	vc         keys.VC
	version    keys.Version
	key        packet.AEAD
	iv         atomic.Uint64 // the last IV used
	rekeyAfter uint64
	stats      packet.Stats
}

// NewOutbound sets up a sending SA whose first packet carries IV 1.
func NewOutbound(c Config) (*Outbound, error) {
	if err := c.check(); err != nil {
		return nil, err
	}
	o := &Outbound{spi: c.SPI, vc: c.VC, version: c.Version, rekeyAfter: c.RekeyAfter}
	if o.rekeyAfter == 0 {
		o.rekeyAfter = DefaultRekeyAfter
	}
	if err := o.key.Init(c.Version, c.Key); err != nil {
		return nil, err
	}
	return o, nil
}

// Seal takes the next IV and writes the packet carrying inner into out (see
// packet.Seal for the buffer rules; sealing in place is allowed). It does
// not allocate.
func (o *Outbound) Seal(out []byte, nextHeader uint8, inner []byte) ([]byte, error) {
	iv, err := o.nextIV()
	if err != nil {
		return nil, err
	}
	h := packet.Header{NextHeader: nextHeader, Version: o.version, SPI: o.spi, IV: iv, VC: o.vc}
	pkt, err := packet.Seal(out, &h, &o.key, inner)
	if err != nil {
		return nil, err
	}
	o.stats.Passed(len(inner))
	return pkt, nil
}

// nextIV claims an IV: 1, 2, ... up to MaxIV, then ErrIVExhausted forever.
func (o *Outbound) nextIV() (uint64, error) {
	for {
		cur := o.iv.Load()
		if cur == MaxIV {
			return 0, ErrIVExhausted
		}
		if o.iv.CompareAndSwap(cur, cur+1) {
			return cur + 1, nil
		}
	}
}

// NeedsRekey reports whether the SA has reached its rekey threshold.
func (o *Outbound) NeedsRekey() bool { return o.iv.Load() >= o.rekeyAfter }

// LastIV is the IV of the last packet sealed (0 before the first).
func (o *Outbound) LastIV() uint64 { return o.iv.Load() }

// Stats returns the SA's counters.
func (o *Outbound) Stats() packet.Snapshot { return o.stats.Snapshot() }

// Inbound is the receiving direction of an SA, with its replay window. It
// is safe for concurrent use.
type Inbound struct {
	spi     keys.SPI
	vc      keys.VC
	version keys.Version
	key     packet.AEAD
	mu      sync.Mutex
	window  replay.Filter
	// packets and bytes are counted under mu, which the replay check takes
	// anyway: no atomic operations per packet. Drops are rare and atomic.
	packets, bytes uint64
	stats          packet.Stats
}

// NewInbound sets up a receiving SA.
func NewInbound(c Config) (*Inbound, error) {
	if err := c.check(); err != nil {
		return nil, err
	}
	in := &Inbound{spi: c.SPI, vc: c.VC, version: c.Version}
	if err := in.key.Init(c.Version, c.Key); err != nil {
		return nil, err
	}
	return in, nil
}

// SPI is the SA's receive SPI.
func (in *Inbound) SPI() keys.SPI { return in.spi }

// Open parses, authenticates and decrypts pkt in place, checks it against
// the replay window, and returns the inner packet (aliasing pkt). p
// receives the parsed header. Every refusal is counted by cause.
func (in *Inbound) Open(p *packet.Parsed, pkt []byte) ([]byte, error) {
	return in.OpenInto(nil, p, pkt)
}

// OpenInto is Open with the inner packet appended to dst instead, leaving
// pkt unchanged; a nil dst means in place, as Open.
func (in *Inbound) OpenInto(dst []byte, p *packet.Parsed, pkt []byte) ([]byte, error) {
	inner, err := in.open(dst, p, pkt)
	if err != nil {
		in.stats.Drop(dropCause(err))
		return nil, err
	}
	return inner, nil
}

func (in *Inbound) open(dst []byte, p *packet.Parsed, pkt []byte) ([]byte, error) {
	if err := packet.Parse(p, pkt); err != nil {
		return nil, err
	}
	if p.SPI != in.spi || p.VC != in.vc || p.Version != in.version {
		return nil, ErrWrongSA
	}
	if dst == nil {
		dst = p.Sealed[:0]
	}
	inner, err := packet.Open(dst, p, &in.key)
	if err != nil {
		return nil, err
	}
	// Only an authenticated IV may move the window.
	in.mu.Lock()
	fresh := in.window.Accept(p.IV)
	if fresh {
		in.packets++
		in.bytes += uint64(len(inner))
	}
	in.mu.Unlock()
	if !fresh {
		clear(inner)
		return nil, ErrReplay
	}
	return inner, nil
}

// Stats returns the SA's counters.
func (in *Inbound) Stats() packet.Snapshot {
	snap := in.stats.Snapshot()
	in.mu.Lock()
	snap.Packets, snap.Bytes = in.packets, in.bytes
	in.mu.Unlock()
	return snap
}

// dropCause maps the errors of this package and those below to a cause.
func dropCause(err error) packet.Cause {
	switch err {
	case ErrReplay:
		return packet.CauseReplay
	case ErrWrongSA, keys.ErrScope, keys.ErrParity:
		return packet.CauseScope
	case ErrNoKey:
		return packet.CauseNoKey
	case ErrGeneration:
		return packet.CauseGeneration
	case keys.ErrEnclaveZero:
		return packet.CauseEnclaveZero
	}
	return packet.CauseOf(err)
}
