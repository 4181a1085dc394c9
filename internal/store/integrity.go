package store

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/enclavekeys/enclave/internal/audit"
	"github.com/enclavekeys/enclave/internal/registry"
)

// ErrTampered: a record of the store does not match its MAC under the KEK:
// it was changed by something other than a key service holding the KEK (or
// the KEK is not the one the store was written with).
var ErrTampered = errors.New("store: a record does not match its MAC under the KEK (changed outside the key service, or a different KEK)")

// MAC purposes: each record kind has its own MAC key, so a MAC of one kind
// never stands for another.
const (
	macRegistry   = "registry"
	macAuditHead  = "audit-head"
	macAuditChain = "audit-chain"
)

// chainKeyer MACs the audit log's entries under the KEK: only a key
// service holding it writes entries that verify (audit.Keyer).
type chainKeyer struct{ k *KEK }

// ChainMAC implements audit.Keyer.
func (c chainKeyer) ChainMAC(hash []byte) []byte { return c.k.mac(macAuditChain, hash) }

// AuditKeyer is the keyer of the audit log of a store under k, for
// checking a log's MACs (enclave audit verify and readers, with the KEK).
func (k *KEK) AuditKeyer() audit.Keyer { return chainKeyer{k} }

// mac is HMAC-SHA256 of data under a key derived from the KEK for purpose.
// The derived key is HMAC-SHA256(KEK, "enclave kek mac v1" 0x00 purpose):
// a PRF of the KEK, separate from the key that seals secrets.
func (k *KEK) mac(purpose string, data []byte) []byte {
	sub, ok := k.macKeys.Load(purpose)
	if !ok {
		d := hmac.New(sha256.New, k.key[:])
		d.Write([]byte("enclave kek mac v1\x00" + purpose))
		sub, _ = k.macKeys.LoadOrStore(purpose, d.Sum(nil))
	}
	m := hmac.New(sha256.New, sub.([]byte))
	m.Write(data)
	return m.Sum(nil)
}

// checkMAC compares a hex MAC in constant time.
func (k *KEK) checkMAC(purpose string, data []byte, macHex string) error {
	got, err := hex.DecodeString(macHex)
	if err != nil || !hmac.Equal(got, k.mac(purpose, data)) {
		return ErrTampered
	}
	return nil
}

// envelope is how a MACed record is stored: the record's exact bytes and
// their MAC.
type envelope struct {
	Record json.RawMessage `json:"record"`
	MAC    string          `json:"mac"`
}

// seal wraps record (JSON) with its MAC.
func (k *KEK) seal(purpose string, record []byte) ([]byte, error) {
	return json.Marshal(envelope{Record: record, MAC: hex.EncodeToString(k.mac(purpose, record))})
}

// open unwraps a sealed record, refusing one whose MAC does not match.
func (k *KEK) open(purpose string, raw []byte) ([]byte, error) {
	var env envelope
	if err := json.Unmarshal(raw, &env); err != nil || len(env.Record) == 0 {
		return nil, fmt.Errorf("%w: the %s record is not in the MACed form", ErrTampered, purpose)
	}
	if err := k.checkMAC(purpose, env.Record, env.MAC); err != nil {
		return nil, fmt.Errorf("%w: the %s record", err, purpose)
	}
	return env.Record, nil
}

// encodeState is the registry as stored: its JSON under a MAC.
func (k *KEK) encodeState(st *registry.State) ([]byte, error) {
	raw, err := json.Marshal(st)
	if err != nil {
		return nil, err
	}
	return k.seal(macRegistry, raw)
}

// decodeState checks and decodes a stored registry; nil is the empty one.
func (k *KEK) decodeState(stored []byte) (*registry.State, error) {
	st := &registry.State{}
	if stored == nil {
		st.Index()
		return st, nil
	}
	raw, err := k.open(macRegistry, stored)
	if err != nil {
		return nil, err
	}
	if err := json.Unmarshal(raw, st); err != nil {
		return nil, fmt.Errorf("store: registry does not decode: %w", err)
	}
	st.Index() // before it is shared
	return st, nil
}

// encodeHead is an audit chain head as stored: under a MAC.
func (k *KEK) encodeHead(h audit.Head) ([]byte, error) {
	raw, err := json.Marshal(h)
	if err != nil {
		return nil, err
	}
	return k.seal(macAuditHead, raw)
}

// decodeHead checks and decodes a stored audit chain head.
func (k *KEK) decodeHead(stored []byte) (audit.Head, error) {
	var h audit.Head
	raw, err := k.open(macAuditHead, stored)
	if err != nil {
		return h, err
	}
	if err := json.Unmarshal(raw, &h); err != nil {
		return h, fmt.Errorf("%w: the audit head does not decode", ErrTampered)
	}
	return h, nil
}
