package store

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"

	"github.com/enclavekeys/enclave/internal/audit"
	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/registry"
)

// Store persists the registry and sealed secrets. Implementations apply
// every Update atomically: concurrent writers never lose an update.
type Store interface {
	// View returns the current registry. It may be shared with other
	// callers: it must not be modified (change state only through Update).
	View(ctx context.Context) (*registry.State, error)
	// Update applies fn to a private copy of the current registry and
	// commits the result if fn returns nil; the committed state is returned
	// (shared from then on, like View's). fn may run more than once (after a
	// conflict), so it must not have side effects outside the state.
	Update(ctx context.Context, fn func(*registry.State) error) (*registry.State, error)
	// Sealed returns the sealed secret stored under name, or nil.
	Sealed(ctx context.Context, name string) ([]byte, error)
	// PutSealedOnce stores a sealed secret under name unless one is there
	// already, and returns whichever is stored afterwards.
	PutSealedOnce(ctx context.Context, name string, sealed []byte) ([]byte, error)
	// Watch delivers each newly committed registry (changes may be
	// coalesced: the latest state always arrives) until ctx ends. On every
	// replica it sees the commits of all replicas.
	Watch(ctx context.Context) <-chan *registry.State
	// Close releases the store.
	Close() error
}

// OrgKeyName is the name the org key is sealed under.
const OrgKeyName = "org-key"

// ErrOrgKeyMismatch: an org key was offered for import, but the store
// already holds a different one.
var ErrOrgKeyMismatch = errors.New("store: the store already holds a different org key")

// ErrKeyMissing: the store holds no sealed key of that name, and creating
// one was not allowed (the organisation already exists: its key was lost or
// removed).
var ErrKeyMissing = errors.New("store: the key is missing from a store that already holds an organisation")

// OrgKey returns the org key: unsealed from the store, or, when the store
// holds none and mayCreate is set, the offered key (an admin-provided org
// key; nil: a random one) sealed and stored. When several replicas start at
// once, exactly one key wins and all use it. A wrong KEK is ErrWrongKEK, an
// offered key that differs from the stored one ErrOrgKeyMismatch, and a
// missing key that may not be created ErrKeyMissing: the service must not
// start.
func OrgKey(ctx context.Context, s Store, kek *KEK, offered *keys.Key, mayCreate bool) (keys.Key, error) {
	return SealedKey(ctx, s, kek, OrgKeyName, offered, mayCreate)
}

// Evidence describes what shows that an organisation already lives in s:
// a registry with content, or an audit log that was written (its anchored
// head in a bbolt store, its head in etcd). It is "" for a store that holds
// none, where a first start may create the org key.
func Evidence(ctx context.Context, s Store) (string, error) {
	st, err := s.View(ctx)
	if err != nil {
		return "", err
	}
	if n := len(st.Enclaves) + st.Devices.Len() + len(st.Grants) + len(st.Generations); n > 0 {
		return fmt.Sprintf("its registry holds %d enclaves and %d devices", len(st.Enclaves), st.Devices.Len()), nil
	}
	var head audit.Head
	var ok bool
	switch b := s.(type) {
	case *Bolt:
		head, ok, err = b.LoadHead()
	case *Etcd:
		_, head, ok, err = NewEtcdAudit(b, nil).Read(ctx)
	}
	if err != nil {
		return "", err
	}
	if ok && head.Seq > 0 {
		return fmt.Sprintf("its audit log has %d entries", head.Seq), nil
	}
	return "", nil
}

// EnclaveKeyName is the name enclave i's key E_i is sealed under.
func EnclaveKeyName(i keys.EnclaveID) string { return fmt.Sprintf("enclave-key/%d", i) }

// SealedKey is OrgKey for any 256-bit key kept sealed under name (an
// enclave key E_i in enclave-key mode).
func SealedKey(ctx context.Context, s Store, kek *KEK, name string, offered *keys.Key, mayCreate bool) (keys.Key, error) {
	sealed, err := s.Sealed(ctx, name)
	if err != nil {
		return keys.Key{}, err
	}
	if sealed == nil && !mayCreate {
		return keys.Key{}, fmt.Errorf("%w: %s", ErrKeyMissing, name)
	}
	if sealed == nil {
		var fresh keys.Key
		if offered != nil {
			fresh = *offered
		} else if _, err := rand.Read(fresh[:]); err != nil {
			return keys.Key{}, err
		}
		mine, err := kek.Seal(name, fresh[:])
		fresh.Zero()
		if err != nil {
			return keys.Key{}, err
		}
		if sealed, err = s.PutSealedOnce(ctx, name, mine); err != nil {
			return keys.Key{}, err
		}
	}
	plain, err := kek.Open(name, sealed)
	if err != nil {
		return keys.Key{}, fmt.Errorf("%s: %w", name, err)
	}
	defer clear(plain)
	k, err := keys.KeyFromBytes(plain)
	if err != nil {
		return keys.Key{}, errors.Join(ErrSealed, err)
	}
	if offered != nil && !k.Equal(offered) {
		k.Zero()
		return keys.Key{}, ErrOrgKeyMismatch
	}
	return k, nil
}
