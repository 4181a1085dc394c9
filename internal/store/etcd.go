package store

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/enclavekeys/enclave/internal/registry"
)

// Etcd is the cluster store: the registry, sealed secrets (and, through
// EtcdAudit, the audit log) live in etcd, so any number of stateless key
// servers serve one organisation.
//
// The registry is kept as records (records.go), one etcd key each under
// PREFIX/r/, and a root (PREFIX/r/root) holding their count and the sum of
// their MACs. An Update is a transaction that writes the records the
// change touched and the new root, if the root has not moved since the
// registry it changed was read: concurrent writers on different replicas
// never lose an update. A change too large for one transaction (etcd
// takes at most 128 operations and 1.5 MiB by default) is written first as
// a journal (PREFIX/j/ID/N, nothing refers to it yet), then committed by
// the root naming it, then settled into the records in batches; until it
// is settled, readers read the records with the journal over them, and
// the next writer settles it first. Every replica keeps the registry in
// memory and follows the records' changes with a watch; each View reads
// the root (a linearizable read) and waits for the registry of that
// revision, so a revocation made through any replica is seen by the next
// request on every replica.
type Etcd struct {
	cli    *clientv3.Client
	prefix string
	kek    *KEK // the records and the audit head are kept under its MACs

	write sync.Mutex // this process's Updates, one at a time

	mu       sync.Mutex
	cond     *sync.Cond
	cache    *registry.State
	root     etcdRoot // the root the cache is
	rootRev  int64    // its revision
	applied  int64    // the revision the cache has every record change up to
	policy   []byte
	dig      digest
	macs     map[string][]byte // record key -> its MAC, for the digest
	broken   error             // what the follower found wrong (tampering)
	follow   context.CancelFunc
	watchers fanout
}

// DefaultPrefix is where Enclave keeps its keys in etcd.
const DefaultPrefix = "/enclave/"

// Transaction bounds: below etcd's defaults (--max-txn-ops 128,
// --max-request-bytes 1.5 MiB), so that a change fits one transaction or
// goes by the journal.
const (
	etcdMaxOps   = 100
	etcdMaxBytes = 1 << 20
	etcdPage     = 2000 // records read per request at a full load
)

// OpenEtcd connects to the etcd endpoints; records are checked and written
// under kek.
func OpenEtcd(endpoints []string, prefix string, kek *KEK) (*Etcd, error) {
	if kek == nil {
		return nil, ErrNoKEK
	}
	if len(endpoints) == 0 {
		return nil, errors.New("store: no etcd endpoints")
	}
	if prefix == "" {
		prefix = DefaultPrefix
	}
	cli, err := clientv3.New(clientv3.Config{Endpoints: endpoints, DialTimeout: 5 * time.Second})
	if err != nil {
		return nil, fmt.Errorf("store: etcd: %w", err)
	}
	e := &Etcd{cli: cli, prefix: strings.TrimSuffix(prefix, "/") + "/"}
	e.kek = kek
	e.cond = sync.NewCond(&e.mu)
	return e, nil
}

// Client is the etcd client (the audit log shares it).
func (e *Etcd) Client() *clientv3.Client { return e.cli }

func (e *Etcd) registryKey() string            { return e.prefix + "registry" } // before issue 36: the whole registry
func (e *Etcd) secretKey(name string) string   { return e.prefix + "secrets/" + name }
func (e *Etcd) recordsPrefix() string          { return e.prefix + "r/" }
func (e *Etcd) rootKey() string                { return e.prefix + "r/root" }
func (e *Etcd) journalPrefix(id string) string { return e.prefix + "j/" + id + "/" }
func (e *Etcd) journalKey(id string, n int) string {
	return fmt.Sprintf("%s%06d", e.journalPrefix(id), n)
}

// etcdKey is where the record with store key k (records.go) lives.
func (e *Etcd) etcdKey(k []byte) string {
	if len(k) > 1 {
		return e.recordsPrefix() + string(k[:1]) + "/" + string(k[2:])
	}
	return e.recordsPrefix() + string(k)
}

// storeKey is the store key of the record at etcd key key ("" and false:
// not a record).
func (e *Etcd) storeKey(key string) ([]byte, bool) {
	s, ok := strings.CutPrefix(key, e.recordsPrefix())
	switch {
	case !ok || s == "root":
		return nil, false
	case len(s) == 1:
		return []byte(s), true
	case len(s) >= 2 && s[1] == '/':
		return recordKey(s[0], s[2:]), true
	}
	return nil, false
}

// journal is a change written before its commit: the records to put (a
// value) or delete (none), by store key.
type journal struct {
	Writes []journalWrite `json:"writes"`
}

type journalWrite struct {
	Key   []byte `json:"k"`
	Value []byte `json:"v,omitempty"` // sealed (MAC and value); nil: delete
}

// etcdRoot is the root record in etcd: root, and the journal not settled
// yet, if any.
type etcdRoot struct {
	root
	Journal string `json:"journal,omitempty"`
	Chunks  int    `json:"chunks,omitempty"`
	// JournalSum is the SHA-256 of the journal's bytes: the root's MAC
	// covers it, so a journal edited (or one of before put back) is
	// refused.
	JournalSum string `json:"journal_sum,omitempty"`
}

func (e *Etcd) encodeRoot(r etcdRoot) (string, error) {
	raw, err := json.Marshal(r)
	if err != nil {
		return "", err
	}
	out, err := e.kek.seal(macRoot, raw)
	return string(out), err
}

func (e *Etcd) decodeRoot(stored []byte) (etcdRoot, error) {
	var r etcdRoot
	raw, err := e.kek.open(macRoot, stored)
	if err != nil {
		return r, err
	}
	if err := json.Unmarshal(raw, &r); err != nil {
		return r, fmt.Errorf("%w: the registry's root record does not decode", ErrTampered)
	}
	return r, nil
}

// View implements Store: the registry as of the root now (a
// linearizable read), shared.
func (e *Etcd) View(ctx context.Context) (*registry.State, error) {
	resp, err := e.cli.Get(ctx, e.rootKey())
	if err != nil {
		return nil, fmt.Errorf("store: etcd: %w", err)
	}
	if len(resp.Kvs) == 0 {
		if err := e.create(ctx); err != nil {
			return nil, err
		}
		return e.View(ctx)
	}
	return e.at(ctx, resp.Kvs[0].ModRevision)
}

// at returns the registry of the root at revision rev: the cache, once
// the follower has reached it (or a full load).
func (e *Etcd) at(ctx context.Context, rev int64) (*registry.State, error) {
	e.mu.Lock()
	if e.follow == nil {
		e.mu.Unlock()
		if err := e.load(ctx); err != nil {
			return nil, err
		}
		e.mu.Lock()
	}
	deadline := time.Now().Add(2 * time.Second)
	timer := time.AfterFunc(2*time.Second, func() { e.mu.Lock(); e.cond.Broadcast(); e.mu.Unlock() })
	defer timer.Stop()
	for e.rootRev < rev && e.broken == nil && time.Now().Before(deadline) && ctx.Err() == nil {
		e.cond.Wait()
	}
	st, got, broken := e.cache, e.rootRev, e.broken
	e.mu.Unlock()
	switch {
	case broken != nil:
		return nil, broken
	case got >= rev:
		return st, nil
	}
	// The follower lags (or its watch broke): read it all again.
	if err := e.load(ctx); err != nil {
		return nil, err
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.cache, e.broken
}

// create gives an etcd without a registry its records: an empty registry,
// or the one record a store of before issue 36 kept, split (once, by
// whichever replica gets there first).
func (e *Etcd) create(ctx context.Context) error {
	old, err := e.cli.Get(ctx, e.registryKey())
	if err != nil {
		return fmt.Errorf("store: etcd: %w", err)
	}
	var raw []byte
	var oldRev int64
	if len(old.Kvs) > 0 {
		raw, oldRev = old.Kvs[0].Value, old.Kvs[0].ModRevision
	}
	st, err := e.kek.decodeState(raw)
	if err != nil {
		return err
	}
	ws, _, err := recordWrites(st, nil, true)
	if err != nil {
		return err
	}
	var dig digest
	cond := []clientv3.Cmp{clientv3.Compare(clientv3.CreateRevision(e.rootKey()), "=", 0),
		clientv3.Compare(clientv3.ModRevision(e.registryKey()), "=", oldRev)}
	var extra []clientv3.Op
	if raw != nil {
		extra = append(extra, clientv3.OpDelete(e.registryKey()))
	}
	_, err = e.commit(ctx, cond, ws, &dig, map[string][]byte{}, extra)
	if errors.Is(err, errConflict) {
		return nil // another replica made it
	}
	return err
}

// load reads the whole registry at one revision, checks it, makes it the
// cache and (re)starts the follower from there.
func (e *Etcd) load(ctx context.Context) error {
	resp, err := e.cli.Get(ctx, e.rootKey())
	if err != nil {
		return fmt.Errorf("store: etcd: %w", err)
	}
	if len(resp.Kvs) == 0 {
		if err := e.create(ctx); err != nil {
			return err
		}
		return e.load(ctx)
	}
	rev := resp.Header.Revision
	r, err := e.decodeRoot(resp.Kvs[0].Value)
	if err != nil {
		return e.fail(err)
	}
	values := map[string][]byte{}
	macs := map[string][]byte{}
	from, end := e.recordsPrefix(), clientv3.GetPrefixRangeEnd(e.recordsPrefix())
	for {
		page, err := e.cli.Get(ctx, from, clientv3.WithRange(end), clientv3.WithRev(rev), clientv3.WithLimit(etcdPage))
		if err != nil {
			return fmt.Errorf("store: etcd: %w", err)
		}
		for _, kv := range page.Kvs {
			k, ok := e.storeKey(string(kv.Key))
			if !ok {
				continue
			}
			value, mac, err := e.kek.openRecord(k, kv.Value)
			if err != nil {
				return e.fail(err)
			}
			values[string(k)], macs[string(k)] = value, mac
		}
		if !page.More || len(page.Kvs) == 0 {
			break
		}
		from = string(page.Kvs[len(page.Kvs)-1].Key) + "\x00"
	}
	if r.Journal != "" { // committed, not settled yet: over the records
		ws, err := e.readJournal(ctx, r, rev)
		if err != nil {
			return e.fail(err)
		}
		for _, w := range ws {
			if w.Value == nil {
				delete(values, string(w.Key))
				delete(macs, string(w.Key))
				continue
			}
			value, mac, err := e.kek.openRecord(w.Key, w.Value)
			if err != nil {
				return e.fail(err)
			}
			values[string(w.Key)], macs[string(w.Key)] = value, mac
		}
	}
	var dig digest
	for _, mac := range macs {
		dig.add(mac)
	}
	if !dig.matches(r.root) {
		return e.fail(fmt.Errorf("%w: the registry's records in etcd are not the ones its root counts (%d records; one deleted, added or put back from an older copy)", ErrTampered, dig.n))
	}
	var l loader
	for k, v := range values {
		if err := l.add([]byte(k), v); err != nil {
			return e.fail(err)
		}
	}
	st, err := l.state()
	if err != nil {
		return e.fail(err)
	}
	fctx, cancel := context.WithCancel(context.Background())
	e.mu.Lock()
	if e.follow != nil {
		e.follow()
	}
	e.root, e.rootRev, e.applied, e.policy, e.dig, e.macs, e.broken, e.follow = r, resp.Kvs[0].ModRevision, rev, l.policy, dig, macs, nil, cancel
	e.publish(st)
	e.mu.Unlock()
	go e.run(fctx, rev)
	return nil
}

// fail records that the registry in etcd is not sound: every View and
// Update says so until a load finds it sound again.
func (e *Etcd) fail(err error) error {
	e.mu.Lock()
	e.broken = err
	e.cond.Broadcast()
	e.mu.Unlock()
	return err
}

// publish makes st the cache and tells the watchers (under e.mu).
func (e *Etcd) publish(st *registry.State) {
	e.cache = st
	e.cond.Broadcast()
	e.watchers.send(st)
}

// readJournal reads the journal r names, as of revision rev.
func (e *Etcd) readJournal(ctx context.Context, r etcdRoot, rev int64) ([]journalWrite, error) {
	var raw []byte
	for n := range r.Chunks {
		resp, err := e.cli.Get(ctx, e.journalKey(r.Journal, n), clientv3.WithRev(rev))
		if err != nil {
			return nil, fmt.Errorf("store: etcd: %w", err)
		}
		if len(resp.Kvs) == 0 {
			return nil, fmt.Errorf("%w: part %d of the registry's journal %s is missing", ErrTampered, n, r.Journal)
		}
		raw = append(raw, resp.Kvs[0].Value...)
	}
	if sum := sha256.Sum256(raw); !hmac.Equal([]byte(hex.EncodeToString(sum[:])), []byte(r.JournalSum)) {
		return nil, fmt.Errorf("%w: the registry's journal %s is not the one its root names", ErrTampered, r.Journal)
	}
	var j journal
	if err := json.Unmarshal(raw, &j); err != nil {
		return nil, fmt.Errorf("%w: the registry's journal %s does not decode", ErrTampered, r.Journal)
	}
	for _, w := range j.Writes {
		if len(w.Key) == 0 || (len(w.Key) > 1 && w.Key[1] != 0) || (len(w.Key) == 1 && w.Key[0] != kindPolicy) {
			return nil, fmt.Errorf("%w: the registry's journal %s names a record %q", ErrTampered, r.Journal, printable(w.Key))
		}
	}
	return j.Writes, nil
}

// run follows the records' changes from revision rev on: each commit's
// records applied to a fork of the cache, the digest checked against the
// root after each.
func (e *Etcd) run(ctx context.Context, rev int64) {
	defer func() {
		if r := recover(); r != nil { // whatever a record held: refused, never a crash
			e.fail(fmt.Errorf("%w: the registry's changes could not be applied: %v", ErrTampered, r))
		}
	}()
	wch := e.cli.Watch(clientv3.WithRequireLeader(ctx), e.recordsPrefix(), clientv3.WithPrefix(), clientv3.WithRev(rev+1))
	for resp := range wch {
		if err := resp.Err(); err != nil {
			if ctx.Err() == nil { // compacted past us, or a broken watch: read it all again
				go e.load(context.Background())
			}
			return
		}
		// Events of one revision (one transaction) together.
		for i := 0; i < len(resp.Events); {
			j := i
			for j < len(resp.Events) && resp.Events[j].Kv.ModRevision == resp.Events[i].Kv.ModRevision {
				j++
			}
			if err := e.apply(ctx, resp.Events[i:j]); err != nil {
				e.fail(err)
				return
			}
			i = j
		}
	}
}

// apply applies one revision's record changes (by another replica, or a
// hand that edited etcd) to a fork of the cache.
func (e *Etcd) apply(ctx context.Context, evs []*clientv3.Event) error {
	rev := evs[0].Kv.ModRevision
	e.mu.Lock()
	defer e.mu.Unlock()
	if rev <= e.applied || e.broken != nil {
		return nil // this replica's own commit, applied as it made it
	}
	st := e.cache.Fork()
	dig := e.dig.clone()
	root, rootRev := e.root, e.rootRev
	var writes []journalWrite
	for _, ev := range evs {
		key := string(ev.Kv.Key)
		if key == e.rootKey() {
			if ev.Type != clientv3.EventTypePut {
				return fmt.Errorf("%w: the registry's root was deleted", ErrTampered)
			}
			r, err := e.decodeRoot(ev.Kv.Value)
			if err != nil {
				return err
			}
			root, rootRev = r, rev
			if r.Journal != "" && r.Journal != e.root.Journal {
				ws, err := e.readJournal(ctx, r, rev)
				if err != nil {
					return err
				}
				writes = append(writes, ws...)
			}
			continue
		}
		k, ok := e.storeKey(key)
		if !ok {
			continue
		}
		w := journalWrite{Key: k}
		if ev.Type == clientv3.EventTypePut {
			w.Value = ev.Kv.Value
		}
		writes = append(writes, w)
	}
	macs := map[string][]byte{} // changed here, over e.macs
	for _, w := range writes {
		old, ok := macs[string(w.Key)]
		if !ok {
			old = e.macs[string(w.Key)]
		}
		if old != nil {
			dig.remove(old)
		}
		if w.Value == nil {
			macs[string(w.Key)] = nil
			if err := setRecord(st, w.Key, nil); err != nil {
				return err
			}
			continue
		}
		value, mac, err := e.kek.openRecord(w.Key, w.Value)
		if err != nil {
			return err
		}
		dig.add(mac)
		macs[string(w.Key)] = mac
		if err := setRecord(st, w.Key, value); err != nil {
			return err
		}
		if w.Key[0] == kindPolicy {
			e.policy = bytes.Clone(value)
		}
	}
	if !dig.matches(root.root) {
		return fmt.Errorf("%w: the registry's records in etcd do not add up to its root after revision %d (a record changed by something other than a key service)", ErrTampered, rev)
	}
	for k, mac := range macs {
		if mac == nil {
			delete(e.macs, k)
		} else {
			e.macs[k] = mac
		}
	}
	e.dig, e.root, e.rootRev, e.applied = dig, root, rootRev, rev
	e.publish(st)
	return nil
}

// setRecord applies one record's value (nil: deleted) to st.
func setRecord(st *registry.State, k, value []byte) error {
	if len(k) == 0 {
		return fmt.Errorf("%w: a record without a key", ErrTampered)
	}
	if k[0] == kindPolicy {
		if value == nil {
			return fmt.Errorf("%w: the registry's policy record was deleted", ErrTampered)
		}
		var p registry.State
		if err := json.Unmarshal(value, &p); err != nil {
			return fmt.Errorf("store: the registry's policy record does not decode: %w", err)
		}
		st.SetPolicy(&p)
		return nil
	}
	if len(k) < 2 {
		return fmt.Errorf("%w: record %q", ErrTampered, printable(k))
	}
	return st.SetRecord(k[0], string(k[2:]), value)
}

// errConflict: another writer moved the root first.
var errConflict = errors.New("store: etcd: the registry changed meanwhile")

// Update implements Store: fn changes a fork of the registry as of now;
// the records it touched are committed if nobody committed since, else fn
// runs again on theirs.
func (e *Etcd) Update(ctx context.Context, fn func(*registry.State) error) (*registry.State, error) {
	e.write.Lock()
	defer e.write.Unlock()
	for attempt := 0; ; attempt++ {
		if _, err := e.View(ctx); err != nil {
			return nil, err
		}
		e.mu.Lock()
		base, root, rev, policy, dig := e.cache, e.root, e.rootRev, e.policy, e.dig.clone()
		st := base.Fork() // under e.mu: the follower forks the same registry
		e.mu.Unlock()
		if root.Journal != "" { // a change committed and not settled: settle it first
			if err := e.settle(ctx, root, rev); err != nil && !errors.Is(err, errConflict) {
				return nil, err
			}
			continue
		}
		if err := fn(st); err != nil {
			return nil, err
		}
		ws, newPolicy, err := recordWrites(st, policy, false)
		if err != nil {
			return nil, err
		}
		if len(ws) == 0 {
			return st, nil
		}
		e.mu.Lock()
		old := make(map[string][]byte, len(ws))
		for _, w := range ws {
			old[string(w.key)] = e.macs[string(w.key)]
		}
		e.mu.Unlock()
		cond := []clientv3.Cmp{clientv3.Compare(clientv3.ModRevision(e.rootKey()), "=", rev)}
		c, err := e.commit(ctx, cond, ws, &dig, old, nil)
		if errors.Is(err, errConflict) {
			if attempt > 100 {
				return nil, errors.New("store: etcd: too much contention on the registry")
			}
			continue // someone else committed first: fn again, on theirs
		}
		if err != nil {
			return nil, err
		}
		e.mu.Lock()
		if c.rev > e.applied && e.broken == nil {
			for k, mac := range c.macs {
				if mac == nil {
					delete(e.macs, k)
				} else {
					e.macs[k] = mac
				}
			}
			e.dig, e.root, e.rootRev, e.applied, e.policy = dig, c.root, c.rev, c.rev, newPolicy
			e.publish(st)
		}
		e.mu.Unlock()
		if c.root.Journal != "" {
			// Committed all the same: a failure here leaves the settling to
			// the next writer.
			_ = e.settle(ctx, c.root, c.rev)
		}
		return st, nil
	}
}

// committed is what a commit wrote.
type committed struct {
	rev  int64
	root etcdRoot
	macs map[string][]byte // record key -> new MAC (nil: deleted)
}

// commit writes ws (and extra operations) if cond holds: in one
// transaction when they fit, else by the journal. dig is brought to the
// new records; old holds the MACs of the records ws replace.
func (e *Etcd) commit(ctx context.Context, cond []clientv3.Cmp, ws []write, dig *digest, old map[string][]byte, extra []clientv3.Op) (committed, error) {
	c := committed{macs: make(map[string][]byte, len(ws))}
	var ops []clientv3.Op
	var jws []journalWrite
	size := 0
	for _, w := range ws {
		if m := old[string(w.key)]; m != nil {
			dig.remove(m)
		}
		if w.value == nil {
			ops = append(ops, clientv3.OpDelete(e.etcdKey(w.key)))
			jws = append(jws, journalWrite{Key: w.key})
			c.macs[string(w.key)] = nil
			continue
		}
		sealed := e.kek.sealRecord(w.key, w.value)
		dig.add(sealed[:32])
		c.macs[string(w.key)] = sealed[:32]
		ops = append(ops, clientv3.OpPut(e.etcdKey(w.key), string(sealed)))
		jws = append(jws, journalWrite{Key: w.key, Value: sealed})
		size += len(w.key) + len(sealed) + 64
	}
	c.root = etcdRoot{root: dig.root()}
	if len(ops)+len(extra) >= etcdMaxOps || size >= etcdMaxBytes {
		// Too large for one transaction: the journal first, then the
		// root naming it commits it.
		raw, err := json.Marshal(journal{Writes: jws})
		if err != nil {
			return c, err
		}
		id := newJournalID()
		sum := sha256.Sum256(raw)
		c.root.JournalSum = hex.EncodeToString(sum[:])
		n := 0
		for len(raw) > 0 || n == 0 {
			part := raw[:min(len(raw), etcdMaxBytes/2)]
			if _, err := e.cli.Put(ctx, e.journalKey(id, n), string(part)); err != nil {
				return c, fmt.Errorf("store: etcd: %w", err)
			}
			raw = raw[len(part):]
			n++
		}
		c.root.Journal, c.root.Chunks = id, n
		ops = extra
	} else {
		ops = append(ops, extra...)
	}
	rootRaw, err := e.encodeRoot(c.root)
	if err != nil {
		return c, err
	}
	txn, err := e.cli.Txn(ctx).If(cond...).Then(append(ops, clientv3.OpPut(e.rootKey(), rootRaw))...).Commit()
	if err != nil {
		return c, fmt.Errorf("store: etcd: %w", err)
	}
	if !txn.Succeeded {
		if c.root.Journal != "" {
			e.cli.Delete(ctx, e.journalPrefix(c.root.Journal), clientv3.WithPrefix())
		}
		return c, errConflict
	}
	c.rev = txn.Header.Revision
	return c, nil
}

func newJournalID() string {
	var b [8]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// settle writes the records of the journal root names (committed at rev)
// in transactions of a bounded size, then a root without it: idempotent,
// so a writer that dies halfway is followed by one that does it again.
func (e *Etcd) settle(ctx context.Context, root etcdRoot, rev int64) error {
	ws, err := e.readJournal(ctx, root, rev)
	if err != nil {
		return err
	}
	for len(ws) > 0 {
		n := min(len(ws), etcdMaxOps-1)
		var ops []clientv3.Op
		size := 0
		for i, w := range ws[:n] {
			size += len(w.Key) + len(w.Value) + 64
			if size >= etcdMaxBytes && i > 0 {
				n = i
				break
			}
			if w.Value == nil {
				ops = append(ops, clientv3.OpDelete(e.etcdKey(w.Key)))
			} else {
				ops = append(ops, clientv3.OpPut(e.etcdKey(w.Key), string(w.Value)))
			}
		}
		// Only while the root still names this journal.
		txn, err := e.cli.Txn(ctx).If(clientv3.Compare(clientv3.ModRevision(e.rootKey()), "=", rev)).Then(ops...).Commit()
		if err != nil {
			return fmt.Errorf("store: etcd: %w", err)
		}
		if !txn.Succeeded {
			return errConflict
		}
		ws = ws[n:]
	}
	clean := root
	clean.Journal, clean.Chunks, clean.JournalSum = "", 0, ""
	rootRaw, err := e.encodeRoot(clean)
	if err != nil {
		return err
	}
	txn, err := e.cli.Txn(ctx).If(clientv3.Compare(clientv3.ModRevision(e.rootKey()), "=", rev)).
		Then(clientv3.OpPut(e.rootKey(), rootRaw), clientv3.OpDelete(e.journalPrefix(root.Journal), clientv3.WithPrefix())).Commit()
	if err != nil {
		return fmt.Errorf("store: etcd: %w", err)
	}
	if !txn.Succeeded {
		return errConflict
	}
	return nil
}

// Watch implements Store: every registry this replica takes, its own
// commits and those it follows (changes may be coalesced: the latest
// always arrives).
func (e *Etcd) Watch(ctx context.Context) <-chan *registry.State {
	if _, err := e.View(ctx); err != nil {
		ch := make(chan *registry.State)
		close(ch)
		return ch
	}
	return e.watchers.watch(ctx)
}

// Sealed implements Store.
func (e *Etcd) Sealed(ctx context.Context, name string) ([]byte, error) {
	resp, err := e.cli.Get(ctx, e.secretKey(name))
	if err != nil {
		return nil, fmt.Errorf("store: etcd: %w", err)
	}
	if len(resp.Kvs) == 0 {
		return nil, nil
	}
	return resp.Kvs[0].Value, nil
}

// PutSealedOnce implements Store.
func (e *Etcd) PutSealedOnce(ctx context.Context, name string, sealed []byte) ([]byte, error) {
	key := e.secretKey(name)
	txn, err := e.cli.Txn(ctx).
		If(clientv3.Compare(clientv3.CreateRevision(key), "=", 0)).
		Then(clientv3.OpPut(key, string(sealed))).
		Else(clientv3.OpGet(key)).
		Commit()
	if err != nil {
		return nil, fmt.Errorf("store: etcd: %w", err)
	}
	if txn.Succeeded {
		return sealed, nil
	}
	kvs := txn.Responses[0].GetResponseRange().Kvs
	if len(kvs) == 0 {
		return nil, errors.New("store: etcd: secret vanished")
	}
	return kvs[0].Value, nil
}

// Close implements Store.
func (e *Etcd) Close() error {
	e.mu.Lock()
	if e.follow != nil {
		e.follow()
	}
	e.mu.Unlock()
	return e.cli.Close()
}
