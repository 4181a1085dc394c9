package store

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"runtime/debug"
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
func OpenBolt(path string, kek *KEK) (_ *Bolt, err error) {
	if kek == nil {
		return nil, ErrNoKEK
	}
	var db *bolt.DB
	// bbolt panics on some damaged pages, and a page number past the
	// mapped file faults: at start, both are a clear error (the fault is
	// made a panic for this goroutine, which reads every page first).
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() {
		if r := recover(); r != nil {
			if db != nil {
				db.Close()
			}
			err = damaged(path, fmt.Errorf("%v", r))
		}
	}()
	db, err = bolt.Open(path, 0o600, &bolt.Options{Timeout: 2 * time.Second})
	if errors.Is(err, bolterrors.ErrTimeout) {
		return nil, fmt.Errorf("store: %s: %w: another process holds it open (is another key server running on this store?)", path, err)
	}
	if err != nil {
		return nil, damaged(path, err)
	}
	// Every page, before anything is read or written: a damaged file stops
	// the start with the page named, never serves part of itself as all.
	if err := db.View(func(tx *bolt.Tx) error {
		if err := checkRuns(tx, int64(db.Info().PageSize)); err != nil {
			return err
		}
		// Every reachable page, here (tx.Check reads them on a goroutine
		// of its own, where a fault could not be caught).
		if err := tx.ForEach(func(_ []byte, b *bolt.Bucket) error { return walkBucket(b) }); err != nil {
			return err
		}
		var first error
		for err := range tx.Check() { // drained: the checker ends with the channel
			if first == nil {
				first = err
			}
		}
		return first
	}); err != nil {
		db.Close()
		return nil, damaged(path, err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		for _, b := range [][]byte{bucketRegistry, bucketSecrets, bucketAudit} {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		// A new store gets its (empty) registry record at once, so that
		// a record missing later is damage, never a new organisation.
		if tx.Bucket(bucketRegistry).Get(keyState) == nil && tx.Bucket(bucketAudit).Get(keyHead) == nil {
			raw, err := kek.encodeState(&registry.State{})
			if err != nil {
				return err
			}
			return tx.Bucket(bucketRegistry).Put(keyState, raw)
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

// checkRuns checks that no page in use claims overflow pages past the
// file's last page: bbolt's own check would loop over billions of them
// (one flipped byte of a page header) and never end.
func checkRuns(tx *bolt.Tx, pageSize int64) error {
	last := int(tx.Size() / pageSize)
	for id := 0; id < last; {
		info, err := tx.Page(id)
		if err != nil || info == nil {
			return err
		}
		if info.Type == "free" {
			id++ // a freed page's header may be stale: never followed
			continue
		}
		if info.OverflowCount < 0 || info.OverflowCount >= last-id {
			return fmt.Errorf("page %d (%s) claims %d more pages, past the file's %d", id, info.Type, info.OverflowCount, last)
		}
		id += 1 + info.OverflowCount
	}
	return nil
}

// walkBucket reads every key, value and nested bucket of b.
func walkBucket(b *bolt.Bucket) error {
	return b.ForEach(func(k, v []byte) error {
		if v == nil {
			if nb := b.Bucket(k); nb != nil {
				return walkBucket(nb)
			}
		}
		return nil
	})
}

// ErrDamaged: the store file is not a sound bbolt file (a flipped byte,
// a torn copy): nothing in it is trusted.
var ErrDamaged = errors.New("the store file is damaged")

func damaged(path string, err error) error {
	return fmt.Errorf("store: %s: %w (%v): restore it from a backup (docs/OPERATIONS.md, \"Back up and restore\")", path, ErrDamaged, err)
}

// state decodes the registry record. A store without one is new, unless
// it holds the audit log's anchor (written with the first entry): then
// the record went missing, and an empty registry must not stand in for it.
func (b *Bolt) state(tx *bolt.Tx) (*registry.State, error) {
	raw := tx.Bucket(bucketRegistry).Get(keyState)
	if raw == nil {
		if tx.Bucket(bucketAudit).Get(keyHead) != nil {
			return nil, damaged(b.db.Path(), errors.New("the registry record is missing, but the audit log's anchor is there"))
		}
	}
	return b.kek.decodeState(raw)
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
		st, err = b.state(tx)
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
func (b *Bolt) Update(_ context.Context, fn func(*registry.State) error) (_ *registry.State, err error) {
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() {
		if r := recover(); r != nil { // a damaged page met on a write
			err = damaged(b.db.Path(), fmt.Errorf("%v", r))
		}
	}()
	var st *registry.State
	err = b.db.Update(func(tx *bolt.Tx) error {
		bk := tx.Bucket(bucketRegistry)
		var err error
		if st, err = b.state(tx); err != nil {
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

// ChainMAC implements audit.Keyer: the file log the store anchors is
// keyed under the store's KEK.
func (b *Bolt) ChainMAC(hash []byte) []byte { return b.kek.mac(macAuditChain, hash) }

// Close implements Store.
func (b *Bolt) Close() error { return b.db.Close() }
