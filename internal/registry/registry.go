// Package registry is the key service's view of the organisation (DESIGN
// §2 and §6): enclaves, devices, which enclave pairs may talk (policy),
// which gateways and monitors may see which pairs (grants), and each pair's
// key generation with its rotation schedule.
//
// State is a plain value changed only through validated methods that
// return clear, typed errors; a store persists it whole and applies each
// change atomically. Time is always passed in, so rotation logic is tested
// without sleeping.
package registry

import (
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"slices"

	"time"

	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/echo"
	"github.com/enclavekeys/enclave/internal/keys"
)

// Errors of the registry. Messages name what is missing or wrong.
var (
	ErrInvalid    = errors.New("registry: invalid request")
	ErrNotFound   = errors.New("registry: not found")
	ErrExists     = errors.New("registry: already exists")
	ErrNotAllowed = errors.New("registry: not allowed by policy")
	// ErrAssertion: the change would break a sight assertion.
	ErrAssertion = errors.New("registry: a sight assertion forbids it")
)

// Enclave is a named group of devices.
type Enclave struct {
	ID   keys.EnclaveID `json:"id"`
	Name string         `json:"name"`
	// Addresses is the block its devices' overlay addresses are handed
	// out from (addresses.go), and Network the overlay network their
	// certificates name (its prefix length), both empty when addresses
	// are typed by hand.
	Addresses string `json:"addresses,omitempty"`
	Network   string `json:"network,omitempty"`
	// EnclaveKey records that its key server holds an enclave key of its
	// own (DESIGN §3's enclave-key mode; level-1 enclaves only, their
	// sub-enclaves with them): its pairs' keys are agreed by exchange, so
	// org key holders, monitors and grants served from the org key read
	// none of its traffic. The key server's own start (--peer,
	// --enclave-key-file) is what makes it so; this is what the map,
	// the assertions and the audit count readers by.
	EnclaveKey bool `json:"enclave_key,omitempty"`
}

// Device is a registered device: what its certificate must say, and
// whether it is revoked.
type Device struct {
	Name     string         `json:"name"`
	Role     ca.Role        `json:"role"`
	Enclave  keys.EnclaveID `json:"enclave,omitempty"`
	ServerID *keys.ServerID `json:"server_id,omitempty"`
	// Fingerprint pins one certificate (ca.Fingerprint); empty accepts any
	// valid certificate with the device's identity.
	Fingerprint string `json:"fingerprint,omitempty"`
	// PrevFingerprint is the certificate a renewal replaced: accepted
	// still, so that a host that lost the renewal's answer keeps working
	// with the one it has.
	PrevFingerprint string     `json:"prev_fingerprint,omitempty"`
	Revoked         bool       `json:"revoked,omitempty"`
	RevokedAt       *time.Time `json:"revoked_at,omitempty"`
	// Removed: an operator removed the revoked device from the lists. Its
	// record stays, so that its revocation stays in force and its name is
	// never registered again (a certificate names a device by name).
	Removed bool `json:"removed,omitempty"`
	// Overlay is the overlay address its certificate carries, with the
	// network's prefix length (100.64.3.5/16), when the registry knows it
	// (handed out, or given to device add or token create): no two
	// devices get one address, and a certificate naming another is
	// refused by the key service.
	Overlay string `json:"overlay,omitempty"`
	// Pending: the device was enrolled with a join token whose host has
	// not confirmed it got its certificate (tokens.go). Its name and
	// server id are held for it; the key service answers it nothing but
	// the confirmation, and an admin may make a new token for it.
	Pending bool `json:"pending,omitempty"`
	// JoinKey is the public key (hex) a pending device's token is bound
	// to: only a certificate for it confirms the join.
	JoinKey string `json:"join_key,omitempty"`
}

// Pair is an unordered pair of enclaves, stored with A <= B.
type Pair struct {
	A keys.EnclaveID `json:"a"`
	B keys.EnclaveID `json:"b"`
}

// NewPair orders i and j.
func NewPair(i, j keys.EnclaveID) Pair { return Pair{min(i, j), max(i, j)} }

// String is "A-B".
func (p Pair) String() string { return fmt.Sprintf("%d-%d", p.A, p.B) }

// ParsePair parses "I-J" in the default layout (ParsePairIn for
// another).
func ParsePair(s string) (Pair, error) { return ParsePairIn(keys.Layout{}, s) }

// Grant lets a gateway see some pairs, or a monitor everything.
type Grant struct {
	Device string `json:"device"`
	Pairs  []Pair `json:"pairs,omitempty"`
	All    bool   `json:"all,omitempty"`
}

// Generation is a pair's key generation and its validity.
type Generation struct {
	Pair    Pair            `json:"pair"`
	Current keys.Generation `json:"current"`
	// RotatedAt is when Current began.
	RotatedAt time.Time `json:"rotated_at"`
	// PreviousUntil is when Current-1 stops being accepted (zero: there
	// is no previous generation).
	PreviousUntil time.Time `json:"previous_until,omitzero"`
	// PendingAt is a rotation asked for within grace of the last one,
	// delayed until then (zero: none pending); PendingReason says why.
	PendingAt     time.Time `json:"pending_at,omitzero"`
	PendingReason string    `json:"pending_reason,omitempty"`
	// Reason is why Current began.
	Reason string `json:"reason,omitempty"`
}

// State is the whole registry.
type State struct {
	Enclaves []Enclave `json:"enclaves"`
	// Devices are by name (the lists that grow with the fleet are
	// Tables: a change copies what it touches).
	Devices Table[string, Device] `json:"devices"`
	Allowed []Pair                `json:"allowed"`
	// Forbidden are forbid rules beneath an allowed pair (levels.go):
	// pair 3.1-7.2 forbidden while 3-7 is allowed.
	Forbidden []Pair `json:"forbidden,omitempty"`
	// EnclaveLayout is the org's sub-enclave layout, as "8.8" (levels.go;
	// empty: the default, one level).
	EnclaveLayout string       `json:"layout,omitempty"`
	Grants        []Grant      `json:"grants"`
	Generations   []Generation `json:"generations"`
	// SPILeases are the servers' SPI counters (spileases.go).
	SPILeases Table[string, SPILease] `json:"spi_leases,omitzero"`
	// Tokens are the join tokens not used yet (tokens.go), by hash.
	Tokens Table[string, JoinToken] `json:"tokens,omitzero"`
	// Endpoints is the endpoint directory (endpoints.go).
	Endpoints Table[string, Endpoint] `json:"endpoints,omitzero"`
	// Assertions are the sight assertions the key service holds every
	// change to (assertions.go).
	Assertions []Assertion `json:"assertions,omitempty"`
	// LastChange names the last admin change committed (its audit
	// entries carry the name), so that the audit log tells a committed
	// change from one whose commit a crash lost.
	LastChange string `json:"last_change,omitempty"`

	idx      *indexes // derived: built at first use (index.go)
	id, base uint64   // this fork's number and its original's (Fork)
}

var nameRE = regexp.MustCompile(`^[A-Za-z0-9._-]{1,64}$`)

// SetEnclaveKeyMode records whether level-1 enclave id's key server holds
// an enclave key of its own, and reports whether that changed.
func (s *State) SetEnclaveKeyMode(id keys.EnclaveID, on bool) (changed bool, err error) {
	e := s.enclave(id)
	switch {
	case e == nil:
		return false, fmt.Errorf("%w: enclave %s", ErrNotFound, s.ID(id))
	case s.TopEnclave(id) != id:
		return false, fmt.Errorf("%w: %s is a sub-enclave: enclave-key mode is its enclave's, %s (an enclave tier holds the whole enclave's key)", ErrInvalid, s.ID(id), s.ID(s.TopEnclave(id)))
	}
	changed = e.EnclaveKey != on
	e.EnclaveKey = on
	return changed, nil
}

// EnclaveKeyMode reports whether enclave id (or, for a sub-enclave, its
// level-1 enclave) is in enclave-key mode.
func (s *State) EnclaveKeyMode(id keys.EnclaveID) bool {
	e := s.enclave(s.TopEnclave(id))
	return e != nil && e.EnclaveKey
}

// Enclave returns the enclave with id.
func (s *State) Enclave(id keys.EnclaveID) (Enclave, bool) {
	for _, e := range s.Enclaves {
		if e.ID == id {
			return e, true
		}
	}
	return Enclave{}, false
}

// Device returns the named device (a copy: a change goes through the
// registry's methods, or SetDevice).
func (s *State) Device(name string) (Device, bool) { return s.Devices.Get(name) }

func (d Device) key() string { return d.Name }

// SetDevice replaces the record of a registered device with d (a pin
// moved by a renewal or a join): its name must be registered, its server
// id and overlay address unchanged.
func (s *State) SetDevice(d Device) error {
	o, ok := s.Devices.Get(d.Name)
	switch {
	case !ok:
		return fmt.Errorf("%w: device %q", ErrNotFound, echo.Cut(d.Name))
	case !sameIdentity(o, d) || o.Overlay != d.Overlay:
		return fmt.Errorf("%w: device %q: its identity and overlay address stay as registered", ErrInvalid, echo.Cut(d.Name))
	}
	s.putDevice(d)
	return nil
}

// AddEnclave registers an enclave; ids and names are unique.
func (s *State) AddEnclave(id keys.EnclaveID, name string) error {
	if id == 0 {
		return fmt.Errorf("%w: %v", ErrInvalid, keys.ErrEnclaveZero)
	}
	if !nameRE.MatchString(name) {
		return fmt.Errorf("%w: enclave name %q must be 1 to 64 letters, digits, '.', '-' or '_'", ErrInvalid, echo.Cut(name))
	}
	for _, e := range s.Enclaves {
		if e.ID == id {
			return fmt.Errorf("%w: enclave %s (%s)", ErrExists, s.ID(id), e.Name)
		}
		if e.Name == name {
			return fmt.Errorf("%w: enclave name %q (id %s)", ErrExists, name, s.ID(e.ID))
		}
	}
	if err := s.checkSub(id); err != nil {
		return err
	}
	s.Enclaves = append(s.Enclaves, Enclave{ID: id, Name: name})
	slices.SortFunc(s.Enclaves, func(a, b Enclave) int { return int(a.ID) - int(b.ID) })
	return nil
}

// AddDevice registers a device. Its fields must fit its role as for a
// certificate; its enclave must exist; server ids are unique.
func (s *State) AddDevice(d Device) error {
	if err := s.couldAdd(d); err != nil {
		return err
	}
	ov, err := s.claimOverlay(d.Name, d.Role, d.Enclave, d.Overlay)
	if err != nil {
		return err
	}
	d.Overlay = ov
	d.Revoked, d.RevokedAt = false, nil
	s.putDevice(d)
	return nil
}

// couldAdd makes AddDevice's checks but the overlay address's.
func (s *State) couldAdd(d Device) error {
	id := ca.Identity{Org: "registry", Name: d.Name, Role: d.Role, Enclave: d.Enclave}
	if d.ServerID != nil {
		id.ServerID, id.HasServerID = *d.ServerID, true
	}
	if err := id.Validate(); err != nil {
		return fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	if o, ok := s.Device(d.Name); ok {
		if o.Removed {
			return fmt.Errorf("%w: device %q was revoked and removed, and its name stays revoked: register the new device under another name", ErrExists, echo.Cut(d.Name))
		}
		return fmt.Errorf("%w: device %q", ErrExists, echo.Cut(d.Name))
	}
	if d.Enclave != 0 {
		if _, ok := s.Enclave(d.Enclave); !ok {
			return fmt.Errorf("%w: enclave %s (add it first)", ErrNotFound, s.ID(d.Enclave))
		}
		if d.Role == ca.RoleKeyserver && s.TopEnclave(d.Enclave) != d.Enclave {
			// An enclave tier holds its level-1 enclave's pair keys, which
			// open every sub-enclave's traffic (DESIGN §3a).
			return fmt.Errorf("%w: a key server serves a whole enclave: register it in enclave %s, not sub-enclave %s", ErrInvalid, s.ID(s.TopEnclave(d.Enclave)), s.ID(d.Enclave))
		}
	}
	if d.ServerID != nil {
		for r := range s.serverIDHolders(uint32(*d.ServerID)) {
			if !r.token {
				return fmt.Errorf("%w: server id %d is %q's", ErrExists, *d.ServerID, r.name)
			}
		}
	}
	return nil
}

// RevokeDevice marks a device revoked; it is refused from then on.
func (s *State) RevokeDevice(name string, now time.Time) (*Device, error) {
	d, ok := s.Device(name)
	if !ok {
		return nil, fmt.Errorf("%w: device %q", ErrNotFound, echo.Cut(name))
	}
	if !d.Revoked {
		t := now.UTC()
		d.Revoked, d.RevokedAt = true, &t
	}
	// A revoked device is no longer pending: no token replaces it, and
	// its join's token goes with it.
	d.Pending = false
	s.putDevice(d)
	s.WithdrawToken(name)
	return &d, nil
}

// ErrNotRevoked: a device must be revoked before it is removed.
var ErrNotRevoked = errors.New("registry: the device is not revoked")

// RemoveDevice takes a revoked device out of the lists and withdraws its
// grants. It stays revoked: the record is kept (Removed), so that no
// certificate of it is accepted again and its name is not reused. A
// device that is not revoked is refused: removing it would not stop its
// certificate.
func (s *State) RemoveDevice(name string) (*Device, error) {
	d, ok := s.Device(name)
	if !ok {
		return nil, fmt.Errorf("%w: device %q", ErrNotFound, echo.Cut(name))
	}
	if !d.Revoked {
		return nil, fmt.Errorf("%w: revoke %s first (admin device revoke --name %s): a removed device must never be accepted again", ErrNotRevoked, d.Name, d.Name)
	}
	d.Removed = true
	s.putDevice(d)
	s.Grants = slices.DeleteFunc(s.Grants, func(g Grant) bool { return g.Device == d.Name })
	return &d, nil
}

// AllowPair lets the enclaves beneath pair i-j talk (i = j: within one
// enclave), at any level: a rule forbidding exactly this pair goes, and if
// no rule above allows it one allowing it is added. The level-1 pair above
// starts at generation 1.
func (s *State) AllowPair(i, j keys.EnclaveID, now time.Time) error {
	for _, e := range []keys.EnclaveID{i, j} {
		if _, ok := s.Enclave(e); !ok {
			return fmt.Errorf("%w: enclave %s", ErrNotFound, s.ID(e))
		}
	}
	p := NewPair(i, j)
	if q, allowed, _ := s.decidingRule(p); allowed {
		if q == p {
			return fmt.Errorf("%w: pair %s is already allowed", ErrExists, s.PairName(p))
		}
		return fmt.Errorf("%w: pair %s is already allowed (by %s)", ErrExists, s.PairName(p), s.PairName(q))
	}
	s.Forbidden = slices.DeleteFunc(s.Forbidden, func(x Pair) bool { return x == p })
	if !s.PairAllowed(p) {
		s.Allowed = append(s.Allowed, p)
		slices.SortFunc(s.Allowed, ComparePairs)
	}
	top := s.Top(p)
	if _, ok := s.generation(top); !ok {
		s.Generations = append(s.Generations, Generation{Pair: top, Current: 1, RotatedAt: now.UTC()})
		slices.SortFunc(s.Generations, func(a, b Generation) int { return ComparePairs(a.Pair, b.Pair) })
	}
	return nil
}

// ForbidPair stops the enclaves beneath pair i-j from talking: a rule
// allowing exactly this pair goes, and if a rule above still allows it a
// rule forbidding it is added (the most specific rule wins, so rules
// beneath it stand). Servers stop being given its keys (and end its SAs),
// gateways stop reading it. The generation is kept, so that allowing it
// again goes on from there (and an SPI is still never leased twice under
// one key).
func (s *State) ForbidPair(i, j keys.EnclaveID) error {
	for _, e := range []keys.EnclaveID{i, j} {
		if _, ok := s.Enclave(e); !ok {
			return fmt.Errorf("%w: enclave %s", ErrNotFound, s.ID(e))
		}
	}
	p := NewPair(i, j)
	if !s.PairAllowed(p) {
		return fmt.Errorf("%w: pair %s is not allowed", ErrNotFound, s.PairName(p))
	}
	s.Allowed = slices.DeleteFunc(s.Allowed, func(x Pair) bool { return x == p })
	if s.PairAllowed(p) {
		s.Forbidden = append(s.Forbidden, p)
		slices.SortFunc(s.Forbidden, ComparePairs)
	}
	return nil
}

// ComparePairs orders pairs by their first enclave, then their second:
// the order the registry keeps its lists in.
func ComparePairs(a, b Pair) int {
	if a.A != b.A {
		return int(a.A) - int(b.A)
	}
	return int(a.B) - int(b.B)
}

// AddGrant lets a gateway see pairs (each must be allowed), or, with all, a
// monitor see everything (explicit grant only).
func (s *State) AddGrant(device string, pairs []Pair, all bool) error {
	d, ok := s.Device(device)
	if !ok {
		return fmt.Errorf("%w: device %q", ErrNotFound, echo.Cut(device))
	}
	switch {
	case all && d.Role != ca.RoleMonitor:
		return fmt.Errorf("%w: only a monitor may be granted everything, %q is a %s", ErrInvalid, device, d.Role)
	case !all && d.Role != ca.RoleGateway:
		return fmt.Errorf("%w: pair grants are for gateways, %q is a %s", ErrInvalid, device, d.Role)
	case !all && len(pairs) == 0:
		return fmt.Errorf("%w: no pairs given", ErrInvalid)
	}
	for _, p := range pairs {
		for _, e := range []keys.EnclaveID{p.A, p.B} {
			if _, ok := s.Enclave(e); !ok {
				return fmt.Errorf("%w: enclave %s of pair %s", ErrNotFound, s.ID(e), s.PairName(p))
			}
		}
		if !s.readable(p) {
			if q, allowed, ok := s.decidingRule(p); ok && !allowed {
				return fmt.Errorf("%w: pair %s is forbidden (rule: pair forbid %s), and nothing beneath it is allowed", ErrNotAllowed, s.PairName(p), s.PairName(q))
			}
			return fmt.Errorf("%w: pair %s is not allowed to talk, nor any pair beneath it (allow it first)", ErrNotAllowed, s.PairName(p))
		}
	}
	g := s.grant(device)
	if g == nil {
		s.Grants = append(s.Grants, Grant{Device: device})
		g = &s.Grants[len(s.Grants)-1]
	}
	g.All = g.All || all
	for _, p := range pairs {
		if !slices.Contains(g.Pairs, p) {
			g.Pairs = append(g.Pairs, p)
		}
	}
	slices.SortFunc(g.Pairs, ComparePairs)
	return nil
}

// RevokeGrant withdraws a gateway's grant of pairs (all of them if none
// given) or a monitor's grant of everything.
func (s *State) RevokeGrant(device string, pairs []Pair) error {
	g := s.grant(device)
	if g == nil {
		return fmt.Errorf("%w: no grant for %q", ErrNotFound, echo.Cut(device))
	}
	if len(pairs) == 0 {
		s.Grants = slices.DeleteFunc(s.Grants, func(x Grant) bool { return x.Device == device })
		return nil
	}
	for _, p := range pairs {
		if !slices.Contains(g.Pairs, p) {
			return fmt.Errorf("%w: %q holds no grant for pair %s", ErrNotFound, device, s.PairName(p))
		}
	}
	g.Pairs = slices.DeleteFunc(g.Pairs, func(p Pair) bool { return slices.Contains(pairs, p) })
	return nil
}

func (s *State) grant(device string) *Grant {
	for i := range s.Grants {
		if s.Grants[i].Device == device {
			return &s.Grants[i]
		}
	}
	return nil
}

// Grant returns a device's grant, if any.
func (s *State) Grant(device string) (Grant, bool) {
	if g := s.grant(device); g != nil {
		return *g, true
	}
	return Grant{}, false
}

// Peers lists the registered enclaves, at any level, that enclave i may
// talk to (i itself when its devices may talk among themselves): a server
// of i holds a server key towards each.
func (s *State) Peers(i keys.EnclaveID) []keys.EnclaveID {
	var out []keys.EnclaveID
	for _, e := range s.Enclaves {
		if s.PairAllowed(NewPair(i, e.ID)) {
			out = append(out, e.ID)
		}
	}
	return out
}

// PairsOf lists the level-1 pairs touching enclave i's level-1 enclave
// under which some pair is allowed: the pair keys an enclave tier of i
// derives its enclave's keys from.
func (s *State) PairsOf(i keys.EnclaveID) []Pair {
	l := s.Layout()
	top, _ := l.Prefix(1, i)
	var out []Pair
	for _, q := range s.Allowed {
		p := At(l, 1, q)
		if (p.A == top || p.B == top) && !slices.Contains(out, p) && s.readable(p) {
			out = append(out, p)
		}
	}
	slices.SortFunc(out, ComparePairs)
	return out
}

// TopPairs lists the level-1 pairs under which some pair is allowed.
func (s *State) TopPairs() []Pair {
	l := s.Layout()
	var out []Pair
	for _, q := range s.Allowed {
		if p := At(l, 1, q); !slices.Contains(out, p) && s.readable(p) {
			out = append(out, p)
		}
	}
	slices.SortFunc(out, ComparePairs)
	return out
}

// GrantedPairs lists the pairs a gateway's grant still covers (granted,
// and the pair or one beneath it still allowed), or every level-1 pair
// with an allowed pair beneath for a monitor granted everything: the pair
// keys, each at its pair's level, the device is given.
func (s *State) GrantedPairs(device string) []Pair {
	g := s.grant(device)
	if g == nil {
		return nil
	}
	if g.All {
		return s.TopPairs()
	}
	var out []Pair
	for _, p := range g.Pairs {
		if s.readable(p) {
			out = append(out, p)
		}
	}
	return out
}

// Clone returns a deep copy of s, to change without touching s (a dry run
// of an admin change).
func (s *State) Clone() (*State, error) {
	raw, err := json.Marshal(s)
	if err != nil {
		return nil, fmt.Errorf("registry: clone: %w", err)
	}
	out := &State{}
	if err := json.Unmarshal(raw, out); err != nil {
		return nil, fmt.Errorf("registry: clone: %w", err)
	}
	return out, nil
}
