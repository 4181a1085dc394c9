package keys

import (
	"encoding/binary"

	"github.com/enclavekeys/enclave/internal/kdf"
)

// Labels of the key schedule (DESIGN §3); the KDF adds the 0x00 separator.
var (
	labelPair   = []byte("enclave-pair")
	labelServer = []byte("server")
	labelPv0    = []byte("Pv0")
	labelPv1    = []byte("Pv1")
)

// Scope says which key a Deriver holds and what it may derive.
type Scope struct {
	// Level is LevelOrg, LevelPair or LevelServer.
	Level Level
	// Enclave and Peer: at LevelPair the pair (either order, both
	// required); at LevelServer the server's own enclave i and the peer's
	// enclave j, or both 0 when unknown, which skips the VC check.
	Enclave, Peer EnclaveID
	// Server is the server id k at LevelServer when Enclave and Peer are set.
	Server ServerID
	// Generation is the key's generation; it counts only if HasGeneration.
	// At LevelOrg it is a derivation input and required; below, it lets the
	// Deriver refuse SPIs of the other parity.
	Generation    Generation
	HasGeneration bool
}

// Deriver holds one prepared key of the hierarchy and derives the keys
// beneath it. It keeps no per-SA state; the next level down from the key
// it holds costs only CMAC blocks and allocates nothing.
// The zero value has no key; Init sets one. A Deriver is safe for concurrent
// use once initialised; it must not be copied after Init.
type Deriver struct {
	prf   kdf.PRF
	scope Scope
	ready bool
}

// NewDeriver returns a Deriver for key with the given scope.
func NewDeriver(key []byte, s Scope) (*Deriver, error) {
	d := new(Deriver)
	if err := d.Init(key, s); err != nil {
		return nil, err
	}
	return d, nil
}

// Init (re-)keys d in place. It checks the scope: the level must be org,
// pair or server; the org level needs a generation; a pair needs both
// enclaves; a server's enclaves are both set or both 0.
func (d *Deriver) Init(key []byte, s Scope) error {
	d.Reset()
	if len(key) != KeySize {
		return ErrKeyLength
	}
	switch s.Level {
	case LevelOrg:
		if !s.HasGeneration {
			return ErrNoGeneration
		}
		s.Enclave, s.Peer, s.Server = 0, 0, 0
	case LevelPair:
		if s.Enclave == 0 || s.Peer == 0 {
			return ErrEnclaveZero
		}
		s.Server = 0
	case LevelServer:
		if (s.Enclave == 0) != (s.Peer == 0) {
			return ErrEnclaveZero
		}
	default:
		return ErrLevel
	}
	if err := d.prf.Init(key); err != nil {
		return err
	}
	d.scope, d.ready = s, true
	return nil
}

// Reset zeroes d's key material.
func (d *Deriver) Reset() { *d = Deriver{} }

// Scope returns what d holds.
func (d *Deriver) Scope() Scope { return d.scope }

// SAKey derives into out the key of the SA named by spi under the packet's
// derivation info vc, for PSP version v. It is the per-packet call: it
// walks down from whatever level d holds and returns an
// unwrapped sentinel error (ErrNoKey, ErrVersion, ErrSPIIndexZero,
// ErrParity, ErrEnclaveZero, ErrScope) when the input is not one d may
// derive for. From a server key it costs two CMAC blocks and allocates
// nothing (out must then be memory the caller keeps off the stack, as the
// AES calls write into it); from a pair or org key it also prepares the
// keys in between, whose AES key schedules crypto/aes allocates.
func (d *Deriver) SAKey(out *SAKey, vc VC, spi SPI, v Version) error {
	if err := d.check(vc, spi, v); err != nil {
		out.Zero()
		return err
	}
	if d.scope.Level == LevelServer {
		return deriveSA(&d.prf, out, spi, v)
	}
	return d.saKeyFromAbove(out, vc, spi, v)
}

// saKeyFromAbove walks down from a pair or org key. It is apart from SAKey
// because the intermediate keys it prepares live on the heap (crypto/aes
// keeps key schedules there), and the server level should not pay for them.
func (d *Deriver) saKeyFromAbove(out *SAKey, vc VC, spi SPI, v Version) error {
	var sk kdf.PRF
	defer sk.Reset()
	var err error
	if d.scope.Level == LevelPair {
		err = deriveServer(&sk, &d.prf, vc)
	} else {
		var ek kdf.PRF
		err = derivePair(&ek, &d.prf, vc.Enclave, vc.Peer, d.scope.Generation)
		if err == nil {
			err = deriveServer(&sk, &ek, vc)
		}
		ek.Reset()
	}
	if err != nil {
		out.Zero()
		return err
	}
	return deriveSA(&sk, out, spi, v)
}

// PairKey derives EK(i,j,g) into out; d must hold the org key.
func (d *Deriver) PairKey(out *Key, i, j EnclaveID) error {
	out.Zero()
	if !d.ready {
		return ErrNoKey
	}
	if d.scope.Level != LevelOrg {
		return ErrLevel
	}
	if i == 0 || j == 0 {
		return ErrEnclaveZero
	}
	return d.prf.Derive(out[:], labelPair, pairContext(i, j, d.scope.Generation))
}

// ServerKey derives SK(i,j,k,g) into out for vc = (i, j, k); d must hold the
// org key or the pair's key.
func (d *Deriver) ServerKey(out *Key, vc VC) error {
	out.Zero()
	if !d.ready {
		return ErrNoKey
	}
	if vc.Enclave == 0 || vc.Peer == 0 {
		return ErrEnclaveZero
	}
	switch d.scope.Level {
	case LevelPair:
		if !d.holdsPair(vc) {
			return ErrScope
		}
		return d.prf.Derive(out[:], labelServer, serverContext(vc))
	case LevelOrg:
		var ek kdf.PRF
		defer ek.Reset()
		if err := derivePair(&ek, &d.prf, vc.Enclave, vc.Peer, d.scope.Generation); err != nil {
			return err
		}
		return ek.Derive(out[:], labelServer, serverContext(vc))
	}
	return ErrLevel
}

// check validates a derivation request against the input rules and d's
// scope, cheapest tests first.
func (d *Deriver) check(vc VC, spi SPI, v Version) error {
	if !d.ready {
		return ErrNoKey
	}
	if !v.Valid() {
		return ErrVersion
	}
	if !spi.Valid() {
		return ErrSPIIndexZero
	}
	if d.scope.HasGeneration && spi.Parity() != d.scope.Generation.Parity() {
		return ErrParity
	}
	switch d.scope.Level {
	case LevelOrg:
		if vc.Enclave == 0 || vc.Peer == 0 {
			return ErrEnclaveZero
		}
	case LevelPair:
		if vc.Enclave == 0 || vc.Peer == 0 {
			return ErrEnclaveZero
		}
		if !d.holdsPair(vc) {
			return ErrScope
		}
	case LevelServer:
		if d.scope.Enclave != 0 && (vc.Enclave != d.scope.Enclave || vc.Peer != d.scope.Peer || vc.Server != d.scope.Server) {
			return ErrScope
		}
	}
	return nil
}

// holdsPair reports whether vc's pair is d's pair, in either order.
func (d *Deriver) holdsPair(vc VC) bool {
	a, b := d.scope.Enclave, d.scope.Peer
	return (vc.Enclave == a && vc.Peer == b) || (vc.Enclave == b && vc.Peer == a)
}

// pairContext is [min(i,j)]16 || [max(i,j)]16 || [g]32. It returns an array
// slice the compiler keeps on the caller's stack.
func pairContext(i, j EnclaveID, g Generation) []byte {
	var c [8]byte
	binary.BigEndian.PutUint16(c[0:], uint16(min(i, j)))
	binary.BigEndian.PutUint16(c[2:], uint16(max(i, j)))
	binary.BigEndian.PutUint32(c[4:], uint32(g))
	return c[:]
}

// serverContext is [i]16 || [j]16 || [k]32.
func serverContext(vc VC) []byte {
	var c [8]byte
	binary.BigEndian.PutUint16(c[0:], uint16(vc.Enclave))
	binary.BigEndian.PutUint16(c[2:], uint16(vc.Peer))
	binary.BigEndian.PutUint32(c[4:], uint32(vc.Server))
	return c[:]
}

// derivePair prepares dst as EK(i,j,g) under the org key ok.
func derivePair(dst, ok *kdf.PRF, i, j EnclaveID, g Generation) error {
	var ek Key
	defer ek.Zero()
	if err := ok.Derive(ek[:], labelPair, pairContext(i, j, g)); err != nil {
		return err
	}
	return dst.Init(ek[:])
}

// deriveServer prepares dst as SK(i,j,k) under the pair key ek.
func deriveServer(dst, ek *kdf.PRF, vc VC) error {
	var sk Key
	defer sk.Zero()
	if err := ek.Derive(sk[:], labelServer, serverContext(vc)); err != nil {
		return err
	}
	return dst.Init(sk[:])
}

// deriveSA writes CK(spi) for version v (already validated) under sk.
func deriveSA(sk *kdf.PRF, out *SAKey, spi SPI, v Version) error {
	var c [4]byte
	binary.BigEndian.PutUint32(c[:], uint32(spi))
	label := labelPv1
	if v == PSPv0 {
		label = labelPv0
	}
	out.v = v
	// A 128-bit key leaves the tail zero, never an earlier key's bytes.
	clear(out.b[v.KeySize():])
	return sk.Derive(out.b[:v.KeySize()], label, c[:])
}
