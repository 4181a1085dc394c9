package store

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	bolt "go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"

	"github.com/enclavekeys/enclave/internal/audit"
	"github.com/enclavekeys/enclave/internal/registry"
)

var (
	bucketRegistry = []byte("registry")
	bucketSecrets  = []byte("secrets")
	bucketAudit    = []byte("audit")
	keyState       = []byte("state")
	keyHead        = []byte("head")
)

// Bolt is the embedded store: one bbolt file. Every Update is one bbolt
// transaction, synced before it returns. The registry and the audit log's
// anchor are kept under a MAC of the KEK, so an edit of the file is found.
type Bolt struct {
	db  *bolt.DB
	kek *KEK
	// cache is the decoded registry as last committed: this process holds
	// the file's lock, so nothing else changes it behind our back.
	mu       sync.RWMutex
	cache    *registry.State
	watchers map[chan *registry.State]struct{}
}

// OpenBolt opens (or creates, mode 0600) the store file, whose records are
// checked and written under kek. Another process holding it open makes this
// fail after a short wait rather than hang.
func OpenBolt(path string, kek *KEK) (*Bolt, error) {
	if kek == nil {
		return nil, ErrNoKEK
	}
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: 2 * time.Second})
	if errors.Is(err, bolterrors.ErrTimeout) {
		return nil, fmt.Errorf("store: %s: %w: another process holds it open (is another key server running on this store?)", path, err)
	}
	if err != nil {
		return nil, fmt.Errorf("store: %s: %w", path, err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		for _, b := range [][]byte{bucketRegistry, bucketSecrets, bucketAudit} {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("store: %s: %w", path, err)
	}
	b := &Bolt{db: db, kek: kek}
	// Check the registry now: a tampered store must stop the start, not
	// the first request.
	if _, err := b.View(context.Background()); err != nil {
		db.Close()
		return nil, fmt.Errorf("store: %s: %w", path, err)
	}
	return b, nil
}

// View implements Store. The state is shared: callers must not modify it.
func (b *Bolt) View(_ context.Context) (*registry.State, error) {
	b.mu.RLock()
	st := b.cache
	b.mu.RUnlock()
	if st != nil {
		return st, nil
	}
	err := b.db.View(func(tx *bolt.Tx) error {
		var err error
		st, err = b.kek.decodeState(tx.Bucket(bucketRegistry).Get(keyState))
		return err
	})
	if err != nil {
		return nil, err
	}
	b.mu.Lock()
	if b.cache == nil {
		b.cache = st
	}
	b.mu.Unlock()
	return st, nil
}

// Update implements Store.
func (b *Bolt) Update(_ context.Context, fn func(*registry.State) error) (*registry.State, error) {
	var st *registry.State
	err := b.db.Update(func(tx *bolt.Tx) error {
		bk := tx.Bucket(bucketRegistry)
		var err error
		if st, err = b.kek.decodeState(bk.Get(keyState)); err != nil {
			return err
		}
		if err := fn(st); err != nil {
			return err
		}
		raw, err := b.kek.encodeState(st)
		if err != nil {
			return err
		}
		return bk.Put(keyState, raw)
	})
	if err != nil {
		return nil, err
	}
	b.mu.Lock()
	b.cache = st
	for ch := range b.watchers {
		// Keep only the latest state for a slow watcher.
		select {
		case <-ch:
		default:
		}
		ch <- st
	}
	b.mu.Unlock()
	return st, nil
}

// Watch implements Store: commits made through this process (which holds
// the file's lock, so there are no others).
func (b *Bolt) Watch(ctx context.Context) <-chan *registry.State {
	ch := make(chan *registry.State, 1)
	b.mu.Lock()
	if b.watchers == nil {
		b.watchers = map[chan *registry.State]struct{}{}
	}
	b.watchers[ch] = struct{}{}
	b.mu.Unlock()
	go func() {
		<-ctx.Done()
		b.mu.Lock()
		delete(b.watchers, ch)
		close(ch)
		b.mu.Unlock()
	}()
	return ch
}

// Sealed implements Store.
func (b *Bolt) Sealed(_ context.Context, name string) ([]byte, error) {
	var out []byte
	err := b.db.View(func(tx *bolt.Tx) error {
		out = bytes.Clone(tx.Bucket(bucketSecrets).Get([]byte(name)))
		return nil
	})
	return out, err
}

// PutSealedOnce implements Store.
func (b *Bolt) PutSealedOnce(_ context.Context, name string, sealed []byte) ([]byte, error) {
	var out []byte
	err := b.db.Update(func(tx *bolt.Tx) error {
		bk := tx.Bucket(bucketSecrets)
		if cur := bk.Get([]byte(name)); cur != nil {
			out = bytes.Clone(cur)
			return nil
		}
		out = bytes.Clone(sealed)
		return bk.Put([]byte(name), sealed)
	})
	return out, err
}

// LoadHead implements audit.Anchor: the audit chain head last saved, if
// any, checked against its MAC.
func (b *Bolt) LoadHead() (audit.Head, bool, error) {
	var raw []byte
	err := b.db.View(func(tx *bolt.Tx) error {
		raw = bytes.Clone(tx.Bucket(bucketAudit).Get(keyHead))
		return nil
	})
	if err != nil || raw == nil {
		return audit.Head{}, false, err
	}
	h, err := b.kek.decodeHead(raw)
	return h, err == nil, err
}

// SaveHead implements audit.Anchor: it records the head of the durable part
// of the audit log, under a MAC, synced before it returns.
func (b *Bolt) SaveHead(h audit.Head) error {
	raw, err := b.kek.encodeHead(h)
	if err != nil {
		return err
	}
	return b.db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bucketAudit).Put(keyHead, raw) })
}

// Empty reports whether the store holds no organisation yet: no registry,
// no sealed secret, no audit anchor.
func (b *Bolt) Empty() (bool, error) {
	empty := true
	err := b.db.View(func(tx *bolt.Tx) error {
		for _, name := range [][]byte{bucketRegistry, bucketSecrets, bucketAudit} {
			if k, _ := tx.Bucket(name).Cursor().First(); k != nil {
				empty = false
			}
		}
		return nil
	})
	return empty, err
}

// Close implements Store.
func (b *Bolt) Close() error { return b.db.Close() }
