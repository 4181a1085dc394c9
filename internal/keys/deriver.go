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
	// Layout is the org's sub-enclave layout (DESIGN §3a; the zero value
	// is the default, one level). A pair or org key derives through every
	// level beneath it down to the server key.
	Layout Layout
	// Sub is, at LevelPair, the level L of the pair key held, EK_L (0
	// means 1); Enclave and Peer are then level-L ids, P_L of the full
	// ids of the packets it covers.
	Sub int
}

// sub is the level of a pair key held (1 when unset).
func (s *Scope) sub() int { return max(s.Sub, 1) }

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
		if s.Sub < 0 || s.Sub > s.Layout.Levels() {
			return ErrLayoutLevel
		}
		if pi, _ := s.Layout.Prefix(s.sub(), s.Enclave); pi != s.Enclave {
			return ErrScope
		}
		if pj, _ := s.Layout.Prefix(s.sub(), s.Peer); pj != s.Peer {
			return ErrScope
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
	if err := d.serverPRF(&sk, vc); err != nil {
		out.Zero()
		return err
	}
	return deriveSA(&sk, out, spi, v)
}

// serverPRF prepares sk as SK(vc) from the pair or org key d holds.
func (d *Deriver) serverPRF(sk *kdf.PRF, vc VC) error {
	var ek kdf.PRF
	defer ek.Reset()
	p, err := d.deepest(&ek, vc)
	if err != nil {
		return err
	}
	return deriveServer(sk, p, vc)
}

// deepest returns EK_D(vc) (D the layout's deepest level): d's own key
// when it holds that, else ek prepared from the pair or org key d holds
// through every level in between.
func (d *Deriver) deepest(ek *kdf.PRF, vc VC) (*kdf.PRF, error) {
	l := &d.scope.Layout
	from := 1
	if d.scope.Level == LevelPair {
		from = d.scope.sub()
		if from == l.Levels() {
			return &d.prf, nil
		}
		if err := deriveSub(ek, &d.prf, l, from+1, vc.Enclave, vc.Peer); err != nil {
			return nil, err
		}
		from++
	} else {
		pi, _ := l.Prefix(1, vc.Enclave)
		pj, _ := l.Prefix(1, vc.Peer)
		if err := derivePair(ek, &d.prf, pi, pj, d.scope.Generation); err != nil {
			return nil, err
		}
	}
	for L := from + 1; L <= l.Levels(); L++ {
		if err := deriveSub(ek, ek, l, L, vc.Enclave, vc.Peer); err != nil {
			return nil, err
		}
	}
	return ek, nil
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
	case LevelOrg:
	default:
		return ErrLevel
	}
	var ek kdf.PRF
	defer ek.Reset()
	p, err := d.deepest(&ek, vc)
	if err != nil {
		return err
	}
	return p.Derive(out[:], labelServer, serverContext(vc))
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
	if d.scope.Level != LevelServer && !d.scope.Layout.IsDefault() {
		// Below the org or a pair key, a VC names enclaves of level 1 at
		// least: a level-1 part of 0 is no enclave's (DESIGN §3a).
		if a, _ := d.scope.Layout.Prefix(1, vc.Enclave); a == 0 {
			return ErrEnclaveZero
		}
		if b, _ := d.scope.Layout.Prefix(1, vc.Peer); b == 0 {
			return ErrEnclaveZero
		}
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

// holdsPair reports whether vc's pair is beneath d's pair (at d's level),
// in either order.
func (d *Deriver) holdsPair(vc VC) bool {
	a, b := d.scope.Enclave, d.scope.Peer
	i, j := vc.Enclave, vc.Peer
	if L := d.scope.sub(); L < d.scope.Layout.Levels() {
		i, _ = d.scope.Layout.Prefix(L, i)
		j, _ = d.scope.Layout.Prefix(L, j)
	}
	return (i == a && j == b) || (i == b && j == a)
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

// deriveSub prepares dst as EK_L(i,j) under EK_{L-1} above (dst may be
// above).
func deriveSub(dst, above *kdf.PRF, l *Layout, L int, i, j EnclaveID) error {
	var ek Key
	defer ek.Zero()
	if err := above.Derive(ek[:], labelSubPair, l.subContext(L, i, j)); err != nil {
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
