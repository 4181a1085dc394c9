package store

import (
	"bytes"
	"crypto/hmac"
	"crypto/sha3"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"math/big"

	"github.com/enclavekeys/enclave/internal/registry"
)

// The registry kept as records (issue 36): one record per device, join
// token, SPI lease and directory entry, and one for the policy (enclaves,
// pair rules, grants, generations, assertions: sized by the organisation's
// design, not its fleet). A change writes the records it touched, so its
// cost does not grow with the number of devices.
//
// Each record is kept under a MAC of the KEK bound to its key, so that a
// record edited, or moved under another key, is found. A root record holds
// the number of records and the sum (mod 2^256) of their MACs, under a
// MAC of its own, kept up to date change by change: a record deleted, or
// put back as an older version of itself, changes the sum, and the store
// refuses to open (ErrTampered).

// Record kinds: the first byte of a record's key.
const (
	kindPolicy   = 'p'
	kindDevice   = registry.RecordDevice
	kindToken    = registry.RecordToken
	kindLease    = registry.RecordLease
	kindEndpoint = registry.RecordEndpoint
)

// policyKey is the policy record's key.
var policyKey = []byte{kindPolicy}

// MAC purposes of the records.
const (
	macRecord = "registry-record"
	macRoot   = "registry-root"
)

// recordKey is the key of the record of kind for table key k.
func recordKey(kind byte, k string) []byte { return append([]byte{kind, 0}, k...) }

// recordMAC is the MAC of a record's value under its key.
func (k *KEK) recordMAC(key, value []byte) []byte {
	msg := make([]byte, 0, 4+len(key)+len(value))
	msg = append(msg, byte(len(key)>>8), byte(len(key)))
	msg = append(msg, key...)
	msg = append(msg, value...)
	return k.mac(macRecord, msg)
}

// sealRecord is a record as stored: its MAC, then its value.
func (k *KEK) sealRecord(key, value []byte) []byte {
	return append(k.recordMAC(key, value), value...)
}

// openRecord checks a stored record and returns its value and MAC.
func (k *KEK) openRecord(key, stored []byte) (value, mac []byte, err error) {
	const n = 32
	if len(stored) < n {
		return nil, nil, fmt.Errorf("%w: record %q is cut short", ErrTampered, printable(key))
	}
	mac, value = stored[:n], stored[n:]
	if !hmac.Equal(mac, k.recordMAC(key, value)) {
		return nil, nil, fmt.Errorf("%w: record %q", ErrTampered, printable(key))
	}
	return value, mac, nil
}

// printable names a record key in an error.
func printable(key []byte) string {
	if len(key) > 2 && key[1] == 0 {
		return string(key[:1]) + "/" + string(key[2:])
	}
	return string(key)
}

// root is the registry's root record: how many records there are and
// the sum of their MACs, each widened to 1,024 bits.
type root struct {
	Records int    `json:"records"`
	Sum     string `json:"sum"` // hex, sumBytes
}

// The sum is taken over each MAC widened to 1,024 bits (SHAKE-256 of it),
// mod 2^1024: a sum of 256-bit values would let someone holding many old
// records (etcd's history, backups) search for a set of them whose sum
// matches (a generalised birthday search), which 1,024 bits puts out of
// reach.
const sumBytes = 128

var modSum = new(big.Int).Lsh(big.NewInt(1), 8*sumBytes)

// digest is the running sum of the records' MACs.
type digest struct {
	n   int
	sum big.Int
}

// widen is mac's element of the sum.
func widen(mac []byte) *big.Int {
	return new(big.Int).SetBytes(sha3.SumSHAKE256(mac, sumBytes))
}

func (d *digest) add(mac []byte) {
	d.n++
	d.sum.Add(&d.sum, widen(mac))
	d.sum.Mod(&d.sum, modSum)
}

func (d *digest) remove(mac []byte) {
	d.n--
	d.sum.Sub(&d.sum, widen(mac))
	d.sum.Mod(&d.sum, modSum)
}

// merge adds o's records to d.
func (d *digest) merge(o *digest) {
	d.n += o.n
	d.sum.Add(&d.sum, &o.sum)
	d.sum.Mod(&d.sum, modSum)
}

// clone is a copy of d to change apart from it.
func (d *digest) clone() digest {
	var c digest
	c.n = d.n
	c.sum.Set(&d.sum)
	return c
}

func (d *digest) root() root {
	b := make([]byte, sumBytes)
	d.sum.FillBytes(b)
	return root{Records: d.n, Sum: hex.EncodeToString(b)}
}

func (d *digest) matches(r root) bool {
	got := d.root()
	return got.Records == r.Records && hmac.Equal([]byte(got.Sum), []byte(r.Sum))
}

// encodeRoot and decodeRoot keep the root under its MAC.
func (k *KEK) encodeRoot(r root) ([]byte, error) {
	raw, err := json.Marshal(r)
	if err != nil {
		return nil, err
	}
	return k.seal(macRoot, raw)
}

func (k *KEK) decodeRoot(stored []byte) (root, error) {
	var r root
	raw, err := k.open(macRoot, stored)
	if err != nil {
		return r, err
	}
	if err := json.Unmarshal(raw, &r); err != nil {
		return r, fmt.Errorf("%w: the registry's root record does not decode", ErrTampered)
	}
	return r, nil
}

// policyOf encodes the registry's policy: everything but its tables.
func policyOf(st *registry.State) ([]byte, error) {
	p := *st
	p.Devices, p.Tokens, p.SPILeases, p.Endpoints = registry.Table[string, registry.Device]{}, registry.Table[string, registry.JoinToken]{},
		registry.Table[string, registry.SPILease]{}, registry.Table[string, registry.Endpoint]{}
	return json.Marshal(&p)
}

// write is one record to put (value non-nil) or delete.
type write struct {
	key, value []byte
}

// recordTable is a registry table as the store writes it.
type recordTable interface {
	EachChanged(func(string, []byte) error) error
	EachRecord(func(string, []byte) error) error
}

// tables are st's tables by record kind.
func tables(st *registry.State) []struct {
	kind byte
	t    recordTable
} {
	return []struct {
		kind byte
		t    recordTable
	}{{kindDevice, &st.Devices}, {kindToken, &st.Tokens}, {kindLease, &st.SPILeases}, {kindEndpoint, &st.Endpoints}}
}

// recordWrites lists the records a change from the registry whose policy
// encoded as oldPolicy to st writes: the table records it touched and the
// policy if it changed; with all, every record (a migration). newPolicy
// is st's.
func recordWrites(st *registry.State, oldPolicy []byte, all bool) (ws []write, newPolicy []byte, err error) {
	if newPolicy, err = policyOf(st); err != nil {
		return nil, nil, err
	}
	if all || !bytes.Equal(newPolicy, oldPolicy) {
		ws = append(ws, write{policyKey, newPolicy})
	}
	for _, t := range tables(st) {
		each := t.t.EachChanged
		if all {
			each = t.t.EachRecord
		}
		err := each(func(k string, raw []byte) error {
			ws = append(ws, write{recordKey(t.kind, k), raw})
			return nil
		})
		if err != nil {
			return nil, nil, err
		}
	}
	return ws, newPolicy, nil
}

// loader builds a registry from its records, in any order.
type loader struct {
	policy    []byte
	devices   []registry.Device
	tokens    []registry.JoinToken
	leases    []registry.SPILease
	endpoints []registry.Endpoint
}

// add decodes one record's value.
func (l *loader) add(key, value []byte) error {
	if len(key) == 0 {
		return fmt.Errorf("%w: a record without a key", ErrTampered)
	}
	var err error
	switch key[0] {
	case kindPolicy:
		l.policy = bytes.Clone(value)
	case kindDevice:
		var d registry.Device
		err = json.Unmarshal(value, &d)
		l.devices = append(l.devices, d)
	case kindToken:
		var t registry.JoinToken
		err = json.Unmarshal(value, &t)
		l.tokens = append(l.tokens, t)
	case kindLease:
		var x registry.SPILease
		err = json.Unmarshal(value, &x)
		l.leases = append(l.leases, x)
	case kindEndpoint:
		var e registry.Endpoint
		err = json.Unmarshal(value, &e)
		l.endpoints = append(l.endpoints, e)
	default:
		return fmt.Errorf("%w: record %q of no known kind", ErrTampered, printable(key))
	}
	if err != nil {
		return fmt.Errorf("store: registry record %q does not decode: %w", printable(key), err)
	}
	return nil
}

// merge takes o's records too.
func (l *loader) merge(o *loader) {
	if o.policy != nil {
		l.policy = o.policy
	}
	l.devices = append(l.devices, o.devices...)
	l.tokens = append(l.tokens, o.tokens...)
	l.leases = append(l.leases, o.leases...)
	l.endpoints = append(l.endpoints, o.endpoints...)
}

// state is the registry the records make, indexed.
func (l *loader) state() (*registry.State, error) {
	st := &registry.State{}
	if l.policy != nil {
		if err := json.Unmarshal(l.policy, st); err != nil {
			return nil, fmt.Errorf("store: the registry's policy record does not decode: %w", err)
		}
	}
	st.Devices = registry.TableOf(l.devices...)
	st.Tokens = registry.TableOf(l.tokens...)
	st.SPILeases = registry.TableOf(l.leases...)
	st.Endpoints = registry.TableOf(l.endpoints...)
	return st.Fork(), nil // indexed, and a fork: the first change's delta is its own
}

// errNoRoot: a records bucket without its root.
var errNoRoot = errors.New("the registry's root record is missing")
