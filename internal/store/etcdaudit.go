package store

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/enclavekeys/enclave/internal/audit"
)

// EtcdAudit is the audit log kept in etcd: one key per entry, in sequence,
// and a head key; each append is one transaction that checks the head has
// not moved, so replicas extend one chain without gaps or forks.
type EtcdAudit struct {
	cli    *clientv3.Client
	prefix string
	now    func() time.Time
}

// NewEtcdAudit returns the audit log of the store's etcd.
func NewEtcdAudit(e *Etcd, now func() time.Time) *EtcdAudit {
	if now == nil {
		now = time.Now
	}
	return &EtcdAudit{cli: e.cli, prefix: e.prefix, now: now}
}

func (a *EtcdAudit) headKey() string            { return a.prefix + "audit-head" }
func (a *EtcdAudit) entryKey(seq uint64) string { return fmt.Sprintf("%saudit/%020d", a.prefix, seq) }

// Append implements audit.Sink.
func (a *EtcdAudit) Append(e audit.Entry) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for attempt := 0; attempt < 1000; attempt++ {
		resp, err := a.cli.Get(ctx, a.headKey())
		if err != nil {
			return fmt.Errorf("audit: etcd: %w", err)
		}
		head, rev := audit.GenesisHead(), int64(0)
		if len(resp.Kvs) > 0 {
			rev = resp.Kvs[0].ModRevision
			if err := json.Unmarshal(resp.Kvs[0].Value, &head); err != nil {
				return fmt.Errorf("audit: etcd head does not decode: %w", err)
			}
		}
		line, next, err := audit.Next(head, e, a.now())
		if err != nil {
			return err
		}
		nh, _ := json.Marshal(next)
		txn, err := a.cli.Txn(ctx).
			If(clientv3.Compare(clientv3.ModRevision(a.headKey()), "=", rev),
				clientv3.Compare(clientv3.CreateRevision(a.entryKey(next.Seq)), "=", 0)).
			Then(clientv3.OpPut(a.entryKey(next.Seq), string(line)), clientv3.OpPut(a.headKey(), string(nh))).
			Commit()
		if err != nil {
			return fmt.Errorf("audit: etcd: %w", err)
		}
		if txn.Succeeded {
			return nil
		}
	}
	return errors.New("audit: etcd: too much contention")
}

// Close implements audit.Sink (the client belongs to the store).
func (a *EtcdAudit) Close() error { return nil }

// Reader returns the whole log as JSON lines, in order, for audit.Verify.
func (a *EtcdAudit) Reader(ctx context.Context) (io.Reader, error) {
	resp, err := a.cli.Get(ctx, a.prefix+"audit/", clientv3.WithPrefix(), clientv3.WithSort(clientv3.SortByKey, clientv3.SortAscend))
	if err != nil {
		return nil, fmt.Errorf("audit: etcd: %w", err)
	}
	var b strings.Builder
	for _, kv := range resp.Kvs {
		b.Write(kv.Value)
		b.WriteByte('\n')
	}
	return strings.NewReader(b.String()), nil
}
