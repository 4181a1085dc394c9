package store

import (
	"context"
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
// servers serve one organisation. Every Update is a compare-and-swap
// transaction on the registry's revision, retried on conflict: concurrent
// writers on different replicas never lose an update.
type Etcd struct {
	cli    *clientv3.Client
	prefix string
	kek    *KEK // the registry and the audit head are kept under its MAC

	mu       sync.Mutex
	cached   *registry.State
	cachedRv int64
}

// DefaultPrefix is where Enclave keeps its keys in etcd.
const DefaultPrefix = "/enclave/"

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
	return &Etcd{cli: cli, prefix: strings.TrimSuffix(prefix, "/") + "/", kek: kek}, nil
}

// Client is the etcd client (the audit log shares it).
func (e *Etcd) Client() *clientv3.Client { return e.cli }

func (e *Etcd) registryKey() string          { return e.prefix + "registry" }
func (e *Etcd) secretKey(name string) string { return e.prefix + "secrets/" + name }

// read returns the registry and its revision, decoding only when it
// changed. Each call is a linearizable read, so a revocation made through
// any replica is seen by the next request on every replica.
func (e *Etcd) read(ctx context.Context) (*registry.State, int64, error) {
	resp, err := e.cli.Get(ctx, e.registryKey())
	if err != nil {
		return nil, 0, fmt.Errorf("store: etcd: %w", err)
	}
	var rev int64
	var raw []byte
	if len(resp.Kvs) > 0 {
		rev, raw = resp.Kvs[0].ModRevision, resp.Kvs[0].Value
	}
	e.mu.Lock()
	if e.cached != nil && e.cachedRv == rev {
		st := e.cached
		e.mu.Unlock()
		return st, rev, nil
	}
	e.mu.Unlock()
	st, err := e.kek.decodeState(raw)
	if err != nil {
		return nil, 0, err
	}
	e.mu.Lock()
	if rev >= e.cachedRv {
		e.cached, e.cachedRv = st, rev
	}
	e.mu.Unlock()
	return st, rev, nil
}

// View implements Store.
func (e *Etcd) View(ctx context.Context) (*registry.State, error) {
	st, _, err := e.read(ctx)
	return st, err
}

// Update implements Store.
func (e *Etcd) Update(ctx context.Context, fn func(*registry.State) error) (*registry.State, error) {
	for attempt := 0; ; attempt++ {
		resp, err := e.cli.Get(ctx, e.registryKey())
		if err != nil {
			return nil, fmt.Errorf("store: etcd: %w", err)
		}
		var rev int64
		var raw []byte
		if len(resp.Kvs) > 0 {
			rev, raw = resp.Kvs[0].ModRevision, resp.Kvs[0].Value
		}
		st, err := e.kek.decodeState(raw) // a private copy for fn
		if err != nil {
			return nil, err
		}
		if err := fn(st); err != nil {
			return nil, err
		}
		out, err := e.kek.encodeState(st)
		if err != nil {
			return nil, err
		}
		txn, err := e.cli.Txn(ctx).
			If(clientv3.Compare(clientv3.ModRevision(e.registryKey()), "=", rev)).
			Then(clientv3.OpPut(e.registryKey(), string(out))).
			Commit()
		if err != nil {
			return nil, fmt.Errorf("store: etcd: %w", err)
		}
		if txn.Succeeded {
			e.mu.Lock()
			if txn.Header.Revision > e.cachedRv {
				e.cached, e.cachedRv = st, txn.Header.Revision
			}
			e.mu.Unlock()
			return st, nil
		}
		// Someone else committed first: run fn again on their result.
		if attempt > 100 {
			return nil, errors.New("store: etcd: too much contention on the registry")
		}
	}
}

// Watch implements Store with an etcd watch on the registry key.
func (e *Etcd) Watch(ctx context.Context) <-chan *registry.State {
	out := make(chan *registry.State, 1)
	go func() {
		defer close(out)
		for resp := range e.cli.Watch(clientv3.WithRequireLeader(ctx), e.registryKey()) {
			if resp.Err() != nil {
				continue
			}
			for _, ev := range resp.Events {
				if ev.Kv == nil || ev.Type != clientv3.EventTypePut {
					continue
				}
				st, err := e.kek.decodeState(ev.Kv.Value)
				if err != nil {
					continue // refused here; View reports it on the next request
				}
				select {
				case <-out:
				default:
				}
				select {
				case out <- st:
				case <-ctx.Done():
					return
				}
			}
		}
	}()
	return out
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
func (e *Etcd) Close() error { return e.cli.Close() }
