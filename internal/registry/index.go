package registry

import (
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"iter"
	"net/netip"
	"strings"
	"sync/atomic"
	"time"
)

// The registry's indexes: the lookups a change makes (is this server id,
// this overlay address, this device's token taken?) answered in O(log n)
// instead of a walk over every device. They are derived from the tables,
// never stored, and forked with them (copied on write).

// ref is one index entry: the key orders it, name and token say whose it
// is (a device, or the join token of one).
type ref struct {
	k     string
	name  string
	hash  string // the token's, for a token
	token bool
}

func (r ref) key() string { return r.k }

// indexes of a registry.
type indexes struct {
	servers Table[string, ref] // "%08x/name/d|t": server ids of devices and tokens
	addrs   Table[string, ref] // "hex16/name/d|t": overlay addresses of devices and tokens
	tokens  Table[string, ref] // "name/hash": tokens by device
	expiry  Table[string, ref] // "%020d/hash": tokens by expiry
	// endpoints are the directory's entries by overlay address
	// ("hex16/name").
	endpoints Table[string, ref]
	// revoked are the revoked devices by name: a watch stream's snapshot
	// lists them without a walk over the fleet.
	revoked Table[string, ref]
	// free is, per address block, an address below which (from the
	// block's start) every address is held: handing out the lowest free
	// address starts there instead of at the block's start.
	free map[netip.Prefix]netip.Addr
}

func serverKey(id uint32) string { return fmt.Sprintf("%08x/", id) }

func addrKey(a netip.Addr) string {
	b := a.As16()
	return hex.EncodeToString(b[:]) + "/"
}

// ix returns s's indexes, built at first use. A shared registry (a
// store's, which readers use at once) is indexed before it is shared
// (Fork, UnmarshalJSON).
func (s *State) ix() *indexes {
	if s.idx == nil {
		x := &indexes{}
		for d := range s.Devices.All() {
			x.addDevice(d)
		}
		for t := range s.Tokens.All() {
			x.addToken(t)
		}
		for e := range s.Endpoints.All() {
			x.endpoints.Put(ref{k: addrKey(e.Overlay) + e.Device, name: e.Device})
		}
		s.idx = x
	}
	return s.idx
}

func (x *indexes) addDevice(d Device) {
	if d.Revoked {
		x.revoked.Put(ref{k: d.Name, name: d.Name})
	}
	if d.ServerID != nil {
		k := serverKey(uint32(*d.ServerID)) + d.Name + "/d"
		x.servers.Put(ref{k: k, name: d.Name})
	}
	if p, err := netip.ParsePrefix(d.Overlay); err == nil {
		k := addrKey(p.Addr()) + d.Name + "/d"
		x.addrs.Put(ref{k: k, name: d.Name})
	}
}

func (x *indexes) dropDevice(d Device) {
	if d.Revoked {
		x.revoked.Delete(d.Name)
	}
	if d.ServerID != nil {
		x.servers.Delete(serverKey(uint32(*d.ServerID)) + d.Name + "/d")
	}
	if p, err := netip.ParsePrefix(d.Overlay); err == nil {
		x.addrs.Delete(addrKey(p.Addr()) + d.Name + "/d")
		x.freed(p.Addr())
	}
}

func (x *indexes) addToken(t JoinToken) {
	d := t.Device
	if d.ServerID != nil {
		x.servers.Put(ref{k: serverKey(uint32(*d.ServerID)) + d.Name + "/t", name: d.Name, hash: t.Hash, token: true})
	}
	if p, err := netip.ParsePrefix(t.Overlay); err == nil {
		x.addrs.Put(ref{k: addrKey(p.Addr()) + d.Name + "/t", name: d.Name, hash: t.Hash, token: true})
	}
	x.tokens.Put(ref{k: d.Name + "/" + t.Hash, name: d.Name, hash: t.Hash, token: true})
	x.expiry.Put(ref{k: expiryKey(t), name: d.Name, hash: t.Hash, token: true})
}

func (x *indexes) dropToken(t JoinToken) {
	d := t.Device
	if d.ServerID != nil {
		x.servers.Delete(serverKey(uint32(*d.ServerID)) + d.Name + "/t")
	}
	if p, err := netip.ParsePrefix(t.Overlay); err == nil {
		x.addrs.Delete(addrKey(p.Addr()) + d.Name + "/t")
		x.freed(p.Addr())
	}
	x.tokens.Delete(d.Name + "/" + t.Hash)
	x.expiry.Delete(expiryKey(t))
}

func expiryKey(t JoinToken) string {
	return fmt.Sprintf("%020d/%s", max(t.Expires.UnixNano(), 0), t.Hash)
}

// freed lowers the free-address hints past a, which is no longer held.
func (x *indexes) freed(a netip.Addr) {
	for p, h := range x.free {
		if p.Contains(a) && a.Less(h) {
			x.free[p] = a
		}
	}
}

// withPrefix yields the entries of t whose key starts with prefix.
func withPrefix(t *Table[string, ref], prefix string) iter.Seq[ref] {
	return func(yield func(ref) bool) {
		for r := range t.From(prefix) {
			if !strings.HasPrefix(r.k, prefix) || !yield(r) {
				return
			}
		}
	}
}

// fork copies the indexes for a fork of their registry.
func (x *indexes) fork() *indexes {
	out := &indexes{servers: x.servers.fork(), addrs: x.addrs.fork(), tokens: x.tokens.fork(), expiry: x.expiry.fork(), endpoints: x.endpoints.fork(), revoked: x.revoked.fork()}
	if len(x.free) > 0 {
		out.free = make(map[netip.Prefix]netip.Addr, len(x.free))
		for p, a := range x.free {
			out.free[p] = a
		}
	}
	return out
}

// forks numbers the registries forked, so that a fork knows the one it
// was made from (Delta).
var forks atomic.Uint64

// Fork returns a copy of s to change apart from it: the tables are copied
// on write (O(1) now, O(log n) per record changed), the rest (enclaves,
// pair rules, grants, generations, assertions: sized by the policy, not
// the fleet) deeply. It remembers what changes from here (Changed). s
// may be read by others meanwhile, but Fork itself is called by one
// writer at a time.
func (s *State) Fork() *State {
	x := s.ix()
	out := &State{
		Enclaves:      clone(s.Enclaves),
		Devices:       s.Devices.fork(),
		Allowed:       clone(s.Allowed),
		Forbidden:     clone(s.Forbidden),
		EnclaveLayout: s.EnclaveLayout,
		Grants:        make([]Grant, len(s.Grants)),
		Generations:   clone(s.Generations),
		SPILeases:     s.SPILeases.fork(),
		Tokens:        s.Tokens.fork(),
		Endpoints:     s.Endpoints.fork(),
		Assertions:    make([]Assertion, len(s.Assertions)),
		LastChange:    s.LastChange,
		idx:           x.fork(),
		id:            forks.Add(1),
		base:          s.id,
	}
	if s.Grants == nil {
		out.Grants = nil
	}
	for i, g := range s.Grants {
		g.Pairs = clone(g.Pairs)
		out.Grants[i] = g
	}
	if s.Assertions == nil {
		out.Assertions = nil
	}
	for i, a := range s.Assertions {
		a.Readers = clone(a.Readers)
		out.Assertions[i] = a
	}
	return out
}

// clone copies a slice, keeping nil nil.
func clone[T any](s []T) []T {
	if s == nil {
		return nil
	}
	return append(make([]T, 0, len(s)), s...)
}

// ForkedFrom reports whether s is a fork of prev (made by prev.Fork()):
// then the devices and tokens that changed from prev to s are exactly
// those Changed names.
func (s *State) ForkedFrom(prev *State) bool {
	return prev != nil && s.base != 0 && s.base == prev.id
}

// Index builds the registry's indexes now, if they are not built: a
// registry decoded by hand is indexed before it is shared (its readers
// may then look things up at once; building is a write).
func (s *State) Index() { s.ix() }

// RevokedDevices yields the revoked devices, by name.
func (s *State) RevokedDevices() iter.Seq[Device] {
	return func(yield func(Device) bool) {
		for r := range s.ix().revoked.All() {
			if d, ok := s.Devices.Get(r.name); ok && !yield(d) {
				return
			}
		}
	}
}

// putDevice adds d, or replaces the device of its name, indexed.
func (s *State) putDevice(d Device) {
	x := s.ix()
	if old, ok := s.Devices.Get(d.Name); ok {
		x.dropDevice(old)
	}
	s.Devices.Put(d)
	x.addDevice(d)
}

// deleteDevice removes device name's record.
func (s *State) deleteDevice(name string) {
	if old, ok := s.Devices.Get(name); ok {
		s.ix().dropDevice(old)
		s.Devices.Delete(name)
	}
}

// putToken adds t, or replaces the token of its hash, indexed.
func (s *State) putToken(t JoinToken) {
	x := s.ix()
	if old, ok := s.Tokens.Get(t.Hash); ok {
		x.dropToken(old)
	}
	s.Tokens.Put(t)
	x.addToken(t)
}

// deleteToken removes the token whose hash is hash.
func (s *State) deleteToken(hash string) {
	if old, ok := s.Tokens.Get(hash); ok {
		s.ix().dropToken(old)
		s.Tokens.Delete(hash)
	}
}

// tokenOf returns the join token made for device name.
func (s *State) tokenOf(name string) (JoinToken, bool) {
	for r := range withPrefix(&s.ix().tokens, name+"/") {
		return s.Tokens.Get(r.hash)
	}
	return JoinToken{}, false
}

// serverIDHolders yields who holds server id k: devices and tokens.
func (s *State) serverIDHolders(k uint32) iter.Seq[ref] {
	return withPrefix(&s.ix().servers, serverKey(k))
}

// expiredTokens lists the hashes of the tokens expired at now.
func (s *State) expiredTokens(now time.Time) []string {
	var out []string
	for r := range s.ix().expiry.All() {
		t, ok := s.Tokens.Get(r.hash)
		if ok && now.Before(t.Expires) {
			break
		}
		out = append(out, r.hash)
	}
	return out
}

// Record kinds: the tables a store keeps one record per entry of, by the
// kind byte it files them under.
const (
	RecordDevice   = 'd'
	RecordToken    = 't'
	RecordLease    = 'l'
	RecordEndpoint = 'e'
)

// SetRecord puts the record of kind under key, from its JSON (nil:
// deletes it), indexed: how a store that follows another writer's
// changes applies them.
func (s *State) SetRecord(kind byte, key string, raw []byte) error {
	var err error
	switch kind {
	case RecordDevice:
		err = setRecord(raw, key, func(d *Device) string { return d.Name }, s.deleteDevice, s.putDevice)
	case RecordToken:
		err = setRecord(raw, key, func(t *JoinToken) string { return t.Hash }, s.deleteToken, s.putToken)
	case RecordLease:
		err = setRecord(raw, key, (*SPILease).key, func(k string) { s.SPILeases.Delete(k) }, s.SPILeases.Put)
	case RecordEndpoint:
		x := s.ix()
		if o, ok := s.Endpoints.Get(key); ok {
			x.endpoints.Delete(addrKey(o.Overlay) + o.Device)
		}
		err = setRecord(raw, key, func(e *Endpoint) string { return e.Device }, func(k string) { s.Endpoints.Delete(k) }, func(e Endpoint) {
			s.Endpoints.Put(e)
			x.endpoints.Put(ref{k: addrKey(e.Overlay) + e.Device, name: e.Device})
		})
	default:
		err = errors.New("no such kind")
	}
	if err != nil {
		return fmt.Errorf("%w: record %c/%s: %v", ErrInvalid, kind, key, err)
	}
	return nil
}

// setRecord applies one record: nil raw deletes key; otherwise raw must
// decode to a T whose own key (keyOf) is key, which put files.
func setRecord[T any](raw []byte, key string, keyOf func(*T) string, del func(string), put func(T)) error {
	if raw == nil {
		del(key)
		return nil
	}
	var v T
	if err := json.Unmarshal(raw, &v); err != nil {
		return err
	}
	if keyOf(&v) != key {
		return errors.New("not its key's")
	}
	put(v)
	return nil
}

// SetPolicy takes everything but the tables from p (a store's policy
// record, decoded).
func (s *State) SetPolicy(p *State) {
	s.Enclaves, s.Allowed, s.Forbidden, s.EnclaveLayout = p.Enclaves, p.Allowed, p.Forbidden, p.EnclaveLayout
	s.Grants, s.Generations, s.Assertions, s.LastChange = p.Grants, p.Generations, p.Assertions, p.LastChange
}
