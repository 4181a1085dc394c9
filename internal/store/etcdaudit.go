package store

import (
	"context"
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
	kek    *KEK // the head is kept under its MAC
	now    func() time.Time
}

// NewEtcdAudit returns the audit log of the store's etcd.
func NewEtcdAudit(e *Etcd, now func() time.Time) *EtcdAudit {
	if now == nil {
		now = time.Now
	}
	return &EtcdAudit{cli: e.cli, prefix: e.prefix, kek: e.kek, now: now}
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
			if head, err = a.kek.decodeHead(resp.Kvs[0].Value); err != nil {
				return fmt.Errorf("audit: etcd head, refusing to extend the log: %w", err)
			}
		}
		line, next, err := audit.Next(head, e, a.now(), a.kek.AuditKeyer())
		if err != nil {
			return err
		}
		nh, err := a.kek.encodeHead(next)
		if err != nil {
			return err
		}
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

// Read returns the whole log as JSON lines, in order, for audit.Verify,
// and its head as the last append recorded it (checked against its MAC;
// ok is false for a log never written). Entries and head are read at one
// revision.
func (a *EtcdAudit) Read(ctx context.Context) (r io.Reader, head audit.Head, ok bool, err error) {
	resp, err := a.cli.Get(ctx, a.prefix+"audit/", clientv3.WithPrefix(), clientv3.WithSort(clientv3.SortByKey, clientv3.SortAscend))
	if err != nil {
		return nil, head, false, fmt.Errorf("audit: etcd: %w", err)
	}
	hr, err := a.cli.Get(ctx, a.headKey(), clientv3.WithRev(resp.Header.Revision))
	if err != nil {
		return nil, head, false, fmt.Errorf("audit: etcd: %w", err)
	}
	if len(hr.Kvs) > 0 {
		if head, err = a.kek.decodeHead(hr.Kvs[0].Value); err != nil {
			return nil, head, false, err
		}
		ok = true
	}
	var b strings.Builder
	for _, kv := range resp.Kvs {
		b.Write(kv.Value)
		b.WriteByte('\n')
	}
	return strings.NewReader(b.String()), head, ok, nil
}

// Walk is Verify giving each sound entry to each, in order.
func (a *EtcdAudit) Walk(ctx context.Context, each func(audit.Entry)) (audit.Result, error) {
	r, head, ok, err := a.Read(ctx)
	if err != nil {
		return audit.Result{}, err
	}
	if !ok {
		head = audit.GenesisHead()
	}
	return audit.VerifyAnchoredKeyed(r, head, a.kek.AuditKeyer(), each)
}

// Verify checks the whole log in etcd: the chain, and that it ends exactly
// at the head the last append recorded under the KEK's MAC (entries and
// head are written in one transaction, so they must agree). Deleted or
// rewritten entries are found; so is a head rewritten without the KEK.
func (a *EtcdAudit) Verify(ctx context.Context) (audit.Result, error) {
	r, head, ok, err := a.Read(ctx)
	if err != nil {
		return audit.Result{}, err
	}
	if !ok {
		head = audit.GenesisHead()
	}
	res, err := audit.VerifyAnchoredKeyed(r, head, a.kek.AuditKeyer(), nil)
	if err != nil {
		return res, err
	}
	if uint64(res.Entries) != head.Seq {
		return res, &audit.VerifyError{Line: int(head.Seq) + 1, Reason: fmt.Sprintf("%d entries follow the recorded head (entry %d): they were added outside the key service", uint64(res.Entries)-head.Seq, head.Seq)}
	}
	return res, nil
}
