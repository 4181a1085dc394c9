package packet

import (
	"errors"
	"sync/atomic"
)

// Errors of the data plane. Each malformation has its own, so that drops
// are counted by cause (Stats); all are returned unwrapped, so a drop costs
// no allocation.
var (
	ErrShort        = errors.New("packet: too short for its PSP header, extensions and tag")
	ErrHdrExtLen    = errors.New("packet: hdr ext len out of range (0, or too small for the VC the V bit announces)")
	ErrNoVC         = errors.New("packet: no VC in the clear (V bit clear, or the crypt offset encrypts it): no key derives from this packet")
	ErrFixedBit     = errors.New("packet: the always-1 bit of PSP header byte 3 is 0")
	ErrVersion      = errors.New("packet: reserved PSP version (0 is AES-128-GCM, 1 AES-256-GCM)")
	ErrGMAC         = errors.New("packet: PSP versions 2 and 3 (AES-GMAC: integrity only, nothing encrypted) are not supported")
	ErrSPIIndexZero = errors.New("packet: SPI index (low 31 bits) is 0")
	ErrCryptOffset  = errors.New("packet: crypt offset out of range (into the tag, or not Enclave's 2)")
	ErrNextHeader   = errors.New("packet: transport mode (next header neither IPv4, 4, nor IPv6, 41): Enclave carries IP packets (tunnel mode)")
	ErrEnclaveZero  = errors.New("packet: VC names enclave 0, which is reserved")
	ErrAuth         = errors.New("packet: authentication failed (wrong key or tampered packet)")
	ErrKeyLength    = errors.New("packet: SA key length does not match the PSP version")
	ErrBuffer       = errors.New("packet: output buffer too small")
	ErrTooLong      = errors.New("packet: inner packet too long")
	ErrIVZero       = errors.New("packet: IV 0 is never sent (the counter starts at 1)")
)

// Cause enumerates the drop causes Stats counts.
type Cause int

// Drop causes, one per error above that a received packet can have, plus
// those the layers above add (replay, no key, scope).
const (
	CauseShort Cause = iota
	CauseHdrExtLen
	CauseNoVC
	CauseFixedBit
	CauseVersion
	CauseSPIIndexZero
	CauseCryptOffset
	CauseNextHeader
	CauseEnclaveZero
	CauseAuth
	CauseIVZero
	CauseReplay
	CauseNoKey
	CauseGeneration
	CauseScope
	CauseOther
	numCauses
)

var causeNames = [numCauses]string{
	"short", "hdr_ext_len", "no_vc", "fixed_bit", "version", "spi_index_zero",
	"crypt_offset", "next_header", "enclave_zero", "auth", "iv_zero", "replay", "no_key", "generation", "scope", "other",
}

// String names the cause as metrics label values do.
func (c Cause) String() string {
	if c < 0 || c >= numCauses {
		return "unknown"
	}
	return causeNames[c]
}

// CauseOf maps a packet error to its cause.
func CauseOf(err error) Cause {
	switch err {
	case ErrShort:
		return CauseShort
	case ErrHdrExtLen:
		return CauseHdrExtLen
	case ErrNoVC:
		return CauseNoVC
	case ErrFixedBit:
		return CauseFixedBit
	case ErrVersion, ErrGMAC:
		return CauseVersion
	case ErrSPIIndexZero:
		return CauseSPIIndexZero
	case ErrCryptOffset:
		return CauseCryptOffset
	case ErrNextHeader:
		return CauseNextHeader
	case ErrEnclaveZero:
		return CauseEnclaveZero
	case ErrAuth:
		return CauseAuth
	case ErrIVZero:
		return CauseIVZero
	}
	return CauseOther
}

// Stats counts packets and drops. It is safe for concurrent use; the zero
// value is ready.
type Stats struct {
	packets, bytes atomic.Uint64
	drops          [numCauses]atomic.Uint64
}

// Passed counts one packet of n inner bytes that got through.
func (s *Stats) Passed(n int) {
	s.packets.Add(1)
	s.bytes.Add(uint64(n))
}

// Drop counts one dropped packet.
func (s *Stats) Drop(c Cause) {
	if c < 0 || c >= numCauses {
		c = CauseOther
	}
	s.drops[c].Add(1)
}

// Snapshot is a copy of Stats at one moment.
type Snapshot struct {
	Packets, Bytes uint64
	Drops          map[string]uint64 // by cause; only non-zero causes
}

// Snapshot reads the counters.
func (s *Stats) Snapshot() Snapshot {
	snap := Snapshot{Packets: s.packets.Load(), Bytes: s.bytes.Load(), Drops: map[string]uint64{}}
	for c := range numCauses {
		if n := s.drops[c].Load(); n > 0 {
			snap.Drops[c.String()] = n
		}
	}
	return snap
}

// Dropped returns the count for one cause.
func (s *Stats) Dropped(c Cause) uint64 {
	if c < 0 || c >= numCauses {
		return 0
	}
	return s.drops[c].Load()
}
