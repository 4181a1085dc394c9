package store

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"runtime"
	"runtime/debug"
	"sync"
	"time"

	bolt "go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"

	"github.com/enclavekeys/enclave/internal/audit"
	"github.com/enclavekeys/enclave/internal/registry"
)

var (
	// bucketRegistry held the whole registry as one record (keyState)
	// until issue 36; a store of then is moved to bucketRecords at its
	// first open.
	bucketRegistry = []byte("registry")
	bucketRecords  = []byte("records")
	keyRoot        = []byte("root")
	bucketSecrets  = []byte("secrets")
	bucketAudit    = []byte("audit")
	keyState       = []byte("state")
	keyHead        = []byte("head")
)

// Bolt is the embedded store: one bbolt file. Every Update is one bbolt
// transaction, synced before it returns, that writes the registry's
// records the change touched (records.go). The registry and the audit
// log's anchor are kept under MACs of the KEK, so an edit of the file is
// found.
type Bolt struct {
	db  *bolt.DB
	kek *KEK
	// write serialises Updates: each forks the registry last committed.
	write sync.Mutex
	// cache is the registry as last committed, with its policy record
	// and the digest of its records: this process holds the file's lock,
	// so nothing else changes it behind our back.
	mu     sync.RWMutex
	cache  *registry.State
	policy []byte
	dig    digest
	// macs are the records' MACs as last written (by key): a change takes
	// the MAC it replaces from here, never from the file, whose bytes an
	// attacker with the file may have set so that the sum comes out right
	// for a record put back later.
	macs     map[string][]byte
	watchers fanout
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
	b := &Bolt{db: db, kek: kek}
	err = db.Update(func(tx *bolt.Tx) error {
		for _, b := range [][]byte{bucketRegistry, bucketRecords, bucketSecrets, bucketAudit} {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		return b.migrate(tx)
	})
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("store: %s: %w", path, err)
	}
	// Check and load the registry now: a tampered store must stop the
	// start, not the first request.
	if err := db.View(b.load); err != nil {
		db.Close()
		return nil, fmt.Errorf("store: %s: %w", path, err)
	}
	return b, nil
}

// migrate gives a store its registry as records: a new store an empty
// registry's root at once (so that a root missing later is damage, never a
// new organisation), a store written before issue 36 its registry record
// split into records, in the transaction that opens it.
func (b *Bolt) migrate(tx *bolt.Tx) error {
	recs := tx.Bucket(bucketRecords)
	if recs.Get(keyRoot) != nil {
		return nil
	}
	old := tx.Bucket(bucketRegistry).Get(keyState)
	if old == nil && tx.Bucket(bucketAudit).Get(keyHead) != nil {
		return damaged(b.db.Path(), errors.New("the registry's records are missing, but the audit log's anchor is there"))
	}
	st, err := b.kek.decodeState(old) // nil: a new store's empty registry
	if err != nil {
		return err
	}
	ws, _, err := recordWrites(st, nil, true)
	if err != nil {
		return err
	}
	if err := b.writeRecords(recs, ws, &digest{}, nil, map[string][]byte{}); err != nil {
		return err
	}
	if old != nil {
		return tx.Bucket(bucketRegistry).Delete(keyState)
	}
	return nil
}

// load reads and checks every record of the registry and makes it the
// cache.
func (b *Bolt) load(tx *bolt.Tx) error {
	recs := tx.Bucket(bucketRecords)
	rootRaw := recs.Get(keyRoot)
	if rootRaw == nil {
		return damaged(b.db.Path(), errNoRoot)
	}
	want, err := b.kek.decodeRoot(rootRaw)
	if err != nil {
		return err
	}
	// Every record's MAC is checked and its value decoded on every core
	// (a start reads the whole registry: issue 36); the bytes stay valid
	// for the transaction.
	var kv [][2][]byte
	if err := recs.ForEach(func(k, v []byte) error {
		if !bytes.Equal(k, keyRoot) {
			kv = append(kv, [2][]byte{k, v})
		}
		return nil
	}); err != nil {
		return err
	}
	workers := min(runtime.GOMAXPROCS(0), max(1, len(kv)/1000))
	parts := make([]struct {
		l    loader
		dig  digest
		macs map[string][]byte
		err  error
	}, workers)
	var wg sync.WaitGroup
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p := &parts[w]
			p.macs = map[string][]byte{}
			for _, r := range kv[w*len(kv)/workers : (w+1)*len(kv)/workers] {
				value, mac, err := b.kek.openRecord(r[0], r[1])
				if err == nil {
					err = p.l.add(r[0], value)
				}
				if err != nil {
					p.err = err
					return
				}
				p.dig.add(mac)
				p.macs[string(r[0])] = bytes.Clone(mac)
			}
		}()
	}
	wg.Wait()
	var l loader
	var dig digest
	macs := make(map[string][]byte, len(kv))
	for _, p := range parts {
		if p.err != nil {
			return p.err
		}
		l.merge(&p.l)
		dig.merge(&p.dig)
		for k, m := range p.macs {
			macs[k] = m
		}
	}
	if !dig.matches(want) {
		return fmt.Errorf("%w: the registry's records are not the ones its root counts (%d records; one deleted, added or put back from an older copy)", ErrTampered, dig.n)
	}
	st, err := l.state()
	if err != nil {
		return err
	}
	b.mu.Lock()
	b.cache, b.policy, b.dig, b.macs = st, l.policy, dig, macs
	b.mu.Unlock()
	return nil
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

// View implements Store. The state is shared: callers must not modify it.
func (b *Bolt) View(_ context.Context) (*registry.State, error) {
	b.mu.RLock()
	defer b.mu.RUnlock()
	return b.cache, nil
}

// Update implements Store: fn changes a fork of the registry (copied on
// write), and the records it touched are written in one transaction.
func (b *Bolt) Update(_ context.Context, fn func(*registry.State) error) (_ *registry.State, err error) {
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() {
		if r := recover(); r != nil { // a damaged page met on a write
			err = damaged(b.db.Path(), fmt.Errorf("%v", r))
		}
	}()
	b.write.Lock()
	defer b.write.Unlock()
	b.mu.RLock()
	base, policy, dig := b.cache, b.policy, b.dig.clone()
	b.mu.RUnlock()
	st := base.Fork()
	if err := fn(st); err != nil {
		return nil, err
	}
	ws, newPolicy, err := recordWrites(st, policy, false)
	if err != nil {
		return nil, err
	}
	if len(ws) == 0 {
		return st, nil // nothing changed: nothing to write or tell
	}
	changed := make(map[string][]byte, len(ws))
	err = b.db.Update(func(tx *bolt.Tx) error {
		clear(changed)
		return b.writeRecords(tx.Bucket(bucketRecords), ws, &dig, b.macs, changed)
	})
	if err != nil {
		return nil, err
	}
	b.mu.Lock()
	for k, m := range changed {
		if m == nil {
			delete(b.macs, k)
		} else {
			b.macs[k] = m
		}
	}
	b.cache, b.policy, b.dig = st, newPolicy, dig
	b.mu.Unlock()
	b.watchers.send(st)
	return st, nil
}

// writeRecords puts (or deletes) the records ws under their MACs, keeps
// dig the sum of the records' MACs (taking the ones replaced from old),
// notes each new MAC in changed (nil: deleted), and writes the root it
// makes.
func (b *Bolt) writeRecords(recs *bolt.Bucket, ws []write, dig *digest, old, changed map[string][]byte) error {
	for _, w := range ws {
		if m, ok := changed[string(w.key)]; ok { // a key written twice in one change
			if m != nil {
				dig.remove(m)
			}
		} else if m := old[string(w.key)]; m != nil {
			dig.remove(m)
		}
		if w.value == nil {
			if err := recs.Delete(w.key); err != nil {
				return err
			}
			changed[string(w.key)] = nil
			continue
		}
		sealed := b.kek.sealRecord(w.key, w.value)
		if err := recs.Put(w.key, sealed); err != nil {
			return err
		}
		dig.add(sealed[:32])
		changed[string(w.key)] = sealed[:32]
	}
	rootRaw, err := b.kek.encodeRoot(dig.root())
	if err != nil {
		return err
	}
	return recs.Put(keyRoot, rootRaw)
}

// Watch implements Store: commits made through this process (which holds
// the file's lock, so there are no others).
func (b *Bolt) Watch(ctx context.Context) <-chan *registry.State { return b.watchers.watch(ctx) }

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
