package store

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"

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

// OrgKey returns the org key: unsealed from the store, or, on first use,
// the offered key (an admin-provided org key; nil: a random one) sealed and
// stored. When several replicas start at once, exactly one key wins and all
// use it. A wrong KEK is ErrWrongKEK, and an offered key that differs from
// the stored one is ErrOrgKeyMismatch: the service must not start.
func OrgKey(ctx context.Context, s Store, kek *KEK, offered *keys.Key) (keys.Key, error) {
	return SealedKey(ctx, s, kek, OrgKeyName, offered)
}

// EnclaveKeyName is the name enclave i's key E_i is sealed under.
func EnclaveKeyName(i keys.EnclaveID) string { return fmt.Sprintf("enclave-key/%d", i) }

// SealedKey is OrgKey for any 256-bit key kept sealed under name (an
// enclave key E_i in enclave-key mode).
func SealedKey(ctx context.Context, s Store, kek *KEK, name string, offered *keys.Key) (keys.Key, error) {
	sealed, err := s.Sealed(ctx, name)
	if err != nil {
		return keys.Key{}, err
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
