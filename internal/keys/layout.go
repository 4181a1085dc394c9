package keys

import (
	"encoding/binary"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/enclavekeys/enclave/internal/kdf"
)

// Sub-enclave levels (DESIGN §3a): an org's layout splits the 16-bit
// enclave id into levels of the given bit widths, most significant first.
// The pair key of level 1 derives as EK does in §3 (from the level-1
// prefixes of the two ids); each lower level's from the one above; the
// server key from the deepest. The default layout, one level of 16 bits,
// is §3's schedule unchanged.
//
// This file is the schedule itself (the functions and enclave keys
// derive --layout). The registry, the key service, the Deriver that
// agents, gateways and NICs open packets with, and the tools take the
// layout in issue 33's next steps: until then they run the default layout
// only.

// MaxLevels bounds a layout's levels (every level at least one bit).
const MaxLevels = 16

// Layout is the bit widths of an org's enclave-id levels; they sum to 16.
// The zero Layout is the default, one level of 16 bits.
type Layout struct {
	n      uint8
	widths [MaxLevels]uint8
}

// Errors of layouts and dotted enclave ids.
var (
	ErrLayout      = errors.New("keys: a layout is bit widths of at least 1 that sum to 16, as 16, 8.8 or 6.5.5")
	ErrLayoutLevel = errors.New("keys: no such level in the layout")
	ErrDotted      = errors.New("keys: not an enclave id of the layout")
)

var labelSubPair = []byte("sub-enclave-pair")

// NewLayout makes a layout of the given widths.
func NewLayout(widths ...int) (Layout, error) {
	var l Layout
	sum := 0
	if len(widths) == 0 || len(widths) > MaxLevels {
		return Layout{}, ErrLayout
	}
	for i, w := range widths {
		if w < 1 || w > 16 {
			return Layout{}, ErrLayout
		}
		l.widths[i] = uint8(w)
		sum += w
	}
	if sum != 16 {
		return Layout{}, ErrLayout
	}
	if len(widths) == 1 {
		return Layout{}, nil // the default: one Layout value, comparable with ==
	}
	l.n = uint8(len(widths))
	return l, nil
}

// IsDefault reports whether l is the default layout, one level of 16 bits.
func (l Layout) IsDefault() bool { return l.n == 0 }

// part is level L's part of id.
func (l Layout) part(level int, id EnclaveID) int {
	shift := 16 - l.bits(level)
	return int(uint32(id)>>shift) & (1<<l.width(level) - 1)
}

// Level is the level of enclave id: the deepest level whose part is not
// 0 (3.2 is at level 2, 3 = 3.0 at level 1), 0 for id 0.
func (l Layout) Level(id EnclaveID) int {
	for L := l.Levels(); L >= 1; L-- {
		if l.part(L, id) != 0 {
			return L
		}
	}
	return 0
}

// Nested reports whether every part of id above its level is not 0: a
// sub-enclave lies beneath an enclave of every level above it (3.0.1 in
// layout 6.5.5 does not: its level-2 part names no sub-enclave).
func (l Layout) Nested(id EnclaveID) bool {
	L := l.Level(id)
	for k := 1; k < L; k++ {
		if l.part(k, id) == 0 {
			return false
		}
	}
	return L > 0
}

// Parent is the enclave a sub-enclave lies in, P_{L-1}(id), and 0 for an
// enclave of level 1.
func (l Layout) Parent(id EnclaveID) EnclaveID {
	L := l.Level(id)
	if L <= 1 {
		return 0
	}
	p, _ := l.Prefix(L-1, id)
	return p
}

// TopEnclave is P_1(id): the level-1 enclave id lies in.
func (l Layout) TopEnclave(id EnclaveID) EnclaveID {
	p, _ := l.Prefix(1, id)
	return p
}

// Short writes id dotted down to its level ("3", "3.2"), as operators
// type it; FormatID writes every level.
func (l Layout) Short(id EnclaveID) string {
	L := max(l.Level(id), 1)
	parts := make([]string, L)
	for k := range parts {
		parts[k] = strconv.Itoa(l.part(k+1, id))
	}
	return strings.Join(parts, ".")
}

// ParseLayout reads a layout written as its widths with dots: "16" (the
// default), "8.8", "6.5.5".
func ParseLayout(s string) (Layout, error) {
	var ws []int
	for _, p := range strings.Split(strings.TrimSpace(s), ".") {
		w, err := strconv.Atoi(p)
		if err != nil {
			return Layout{}, fmt.Errorf("%w (not %q)", ErrLayout, s)
		}
		ws = append(ws, w)
	}
	l, err := NewLayout(ws...)
	if err != nil {
		return Layout{}, fmt.Errorf("%w (not %q)", err, s)
	}
	return l, nil
}

// Levels is D, the number of levels.
func (l Layout) Levels() int {
	if l.n == 0 {
		return 1
	}
	return int(l.n)
}

// width is level L's width (L from 1).
func (l Layout) width(level int) int {
	if l.n == 0 {
		return 16
	}
	return int(l.widths[level-1])
}

// String writes the layout as ParseLayout reads it.
func (l Layout) String() string {
	parts := make([]string, l.Levels())
	for i := range parts {
		parts[i] = strconv.Itoa(l.width(i + 1))
	}
	return strings.Join(parts, ".")
}

// bits is w1+...+wL.
func (l Layout) bits(level int) int {
	b := 0
	for i := 1; i <= level; i++ {
		b += l.width(i)
	}
	return b
}

// Prefix is P_L(id): the top w1+...+wL bits of id, the others cleared.
func (l Layout) Prefix(level int, id EnclaveID) (EnclaveID, error) {
	if level < 1 || level > l.Levels() {
		return 0, ErrLayoutLevel
	}
	keep := l.bits(level)
	return id &^ EnclaveID(uint16(0xffff)>>keep), nil
}

// ParseID reads a dotted enclave id, most significant part first: with
// layout 8.8, "3.2" is 0x0302 and "3" is 3.0 = 0x0300. Each part must fit
// its level's width; an id of 0 is refused (reserved).
func (l Layout) ParseID(s string) (EnclaveID, error) {
	if l.IsDefault() && !strings.Contains(s, ".") { // a plain id, as everywhere else
		id, err := ParseEnclaveID(s)
		if err != nil {
			return 0, fmt.Errorf("%w: %w", ErrDotted, err)
		}
		return id, nil
	}
	parts := strings.Split(strings.TrimSpace(s), ".")
	if len(parts) > l.Levels() {
		levels := "levels"
		if l.Levels() == 1 {
			levels = "level (the default: dotted ids need an org made with --enclave-layout; give the tool its layout, --layout, as enclave admin status says it)"
		}
		return 0, fmt.Errorf("%w: %q has %d parts; layout %s has %d %s", ErrDotted, s, len(parts), l, l.Levels(), levels)
	}
	var id uint32
	shift := 16
	for i := 1; i <= l.Levels(); i++ {
		w := l.width(i)
		shift -= w
		if i > len(parts) {
			continue
		}
		v, err := strconv.ParseUint(parts[i-1], 10, 16)
		if err != nil || v >= 1<<w {
			return 0, fmt.Errorf("%w: part %d of %q must be 0 to %d (layout %s)", ErrDotted, i, s, 1<<w-1, l)
		}
		id |= uint32(v) << shift
	}
	if id == 0 {
		return 0, fmt.Errorf("%w: %w", ErrDotted, ErrEnclaveZero)
	}
	return EnclaveID(id), nil
}

// FormatID writes id dotted (every level, as 3.2 or 3.0).
func (l Layout) FormatID(id EnclaveID) string {
	parts := make([]string, l.Levels())
	shift := 16
	for i := range parts {
		w := l.width(i + 1)
		shift -= w
		parts[i] = strconv.Itoa(int(uint32(id)>>shift) & (1<<w - 1))
	}
	return strings.Join(parts, ".")
}

// PairKeyAt returns EK_level(i,j,g) under the org key (or, in enclave-key
// mode, the level-1 pair key's root: E_i, or the exchanged secret):
//
//	EK_1 = KDF(root, "enclave-pair", [min(P_1)]16 || [max(P_1)]16 || [g]32, 256)
//	EK_L = KDF(EK_{L-1}, "sub-enclave-pair", [L]8 || [min(P_L)]16 || [max(P_L)]16, 256)
func PairKeyAt(root *Key, l Layout, level int, i, j EnclaveID, g Generation) (Key, error) {
	if level < 1 || level > l.Levels() {
		return Key{}, ErrLayoutLevel
	}
	pi, _ := l.Prefix(1, i)
	pj, _ := l.Prefix(1, j)
	ek, err := PairKey(root, pi, pj, g)
	if err != nil {
		return Key{}, err
	}
	return SubPairKey(&ek, l, 2, level, i, j)
}

// SubPairKey derives, from EK_{from-1}(i,j,g), the pair keys of levels
// from to level and returns EK_level (EK_{from-1} itself when level is
// from-1): a holder of a pair key at some level derives those beneath it.
func SubPairKey(above *Key, l Layout, from, level int, i, j EnclaveID) (Key, error) {
	if from < 2 || level < from-1 || level > l.Levels() {
		return Key{}, ErrLayoutLevel
	}
	cur := *above
	for L := from; L <= level; L++ {
		var p kdf.PRF
		if err := p.Init(cur[:]); err != nil {
			return Key{}, err
		}
		var next Key
		err := p.Derive(next[:], labelSubPair, l.subContext(L, i, j))
		p.Reset()
		cur.Zero()
		if err != nil {
			return Key{}, err
		}
		cur = next
	}
	return cur, nil
}

// ServerKeyAt returns SK(i,j,k,g) under layout l: KDF(EK_D(i,j,g),
// "server", [i]16 || [j]16 || [k]32, 256), with the full ids.
func ServerKeyAt(root *Key, l Layout, vc VC, g Generation) (Key, error) {
	ek, err := PairKeyAt(root, l, l.Levels(), vc.Enclave, vc.Peer, g)
	defer ek.Zero()
	if err != nil {
		return Key{}, err
	}
	return ServerKey(&ek, vc)
}

// subContext is [L]8 || [min(P_L(i),P_L(j))]16 || [max(P_L(i),P_L(j))]16,
// an array slice the compiler keeps on the caller's stack.
func (l *Layout) subContext(L int, i, j EnclaveID) []byte {
	pi, _ := l.Prefix(L, i)
	pj, _ := l.Prefix(L, j)
	var c [5]byte
	c[0] = byte(L)
	binary.BigEndian.PutUint16(c[1:], uint16(min(pi, pj)))
	binary.BigEndian.PutUint16(c[3:], uint16(max(pi, pj)))
	return c[:]
}
