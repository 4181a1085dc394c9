package keyserver

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sort"

	"github.com/enclavekeys/enclave/internal/audit"
	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/registry"
)

// The store against its audit log, at start. The log is a separate file
// that the key service verifies (chain and anchor) before it serves; it
// records every SPI range leased and every registry change committed.
// A store that is behind it (restored from a backup, rebuilt, or damaged
// so that it reads as empty) must not serve as if nothing happened:
//
//   - its SPI counters are raised to the highest range the log shows
//     leased, so no range is leased twice under one server key (a repeat
//     is an AES-GCM key and nonce pair used twice);
//   - a registry older than the last change the log shows committed is
//     refused unless the operator says it was restored on purpose
//     (--restored): the devices, grants and rules of the changes after it
//     are gone, and that must be a decision, not an accident.

// ErrStoreBehind: the store's registry is older than its audit log says
// it was (a restored backup, a rebuilt or damaged store).
var ErrStoreBehind = errors.New("keyserver: the store is behind its audit log")

// leaseKey names one server key's SPI counter.
type leaseKey struct {
	i, j keys.EnclaveID
	k    keys.ServerID
	g    keys.Generation
}

// History is what the audit log says the store must at least hold.
type History struct {
	leased map[leaseKey]uint64 // the counter's high-water mark
	// head is the last change the log proves committed, and pending the
	// attempts after it whose commit it does not show yet (the store may
	// hold one of them: a crash between the entry and the next proof).
	head    string
	pending map[string]bool
	seen    map[string]bool // every change attempted
}

// NewHistory is an empty history, to be given a verified log's entries in
// order (History.Add; audit.OpenEach reads them as it verifies the log).
func NewHistory() *History {
	return &History{leased: map[leaseKey]uint64{}, pending: map[string]bool{}, seen: map[string]bool{}}
}

// Add reads one entry. Each change's own entry names the change
// committed before it (Follows), so reading it proves that one; a start
// names the store's last change as it found it, and a restore
// (--restored) the one the store went back to: both set the head, and
// what was attempted after it is then void.
func (h *History) Add(e audit.Entry) {
	switch {
	case (e.RPC == "start" || e.RPC == "stop") && e.Follows != "", e.RPC == rpcRestore:
		h.head, h.pending = e.Follows, map[string]bool{}
	case e.Change != "" && !h.seen[e.Change]: // a change's own entry comes first
		h.seen[e.Change] = true
		if e.Follows != h.head {
			h.head, h.pending = e.Follows, map[string]bool{}
		}
		h.pending[e.Change] = true
	}
	if e.RPC == "LeaseSPIs" && e.Decision == audit.Allow && e.IDs != nil && e.IDs.Server != nil && e.Generation != nil {
		var first, last uint64
		if n, _ := fmt.Sscanf(e.Reason, "SPI counter values %d to %d", &first, &last); n == 2 && last >= first {
			k := leaseKey{keys.EnclaveID(e.IDs.Enclave), keys.EnclaveID(e.IDs.Peer), keys.ServerID(*e.IDs.Server), keys.Generation(*e.Generation)}
			h.leased[k] = max(h.leased[k], last+1)
		}
	}
}

// readHistory walks a verified audit log.
func readHistory(r io.Reader) (*History, error) {
	h := NewHistory()
	if _, err := audit.Walk(r, h.Add); err != nil {
		return nil, err
	}
	return h, nil
}

// rpcRestore is the RPC name of the entry a start with --restored writes.
const rpcRestore = "restore"

// Reconcile checks the store against the audit log read from r (the
// file the service writes to, verified) before the service serves: a
// registry behind the log is refused with ErrStoreBehind unless restored
// is set (then the rollback is audited), and SPI counters behind the
// log's leases are raised to them (audited). Call it before serving.
func (s *Service) Reconcile(ctx context.Context, r io.Reader, restored bool) error {
	h, err := readHistory(r)
	if err != nil {
		return fmt.Errorf("keyserver: reading the audit log: %w", err)
	}
	return s.ReconcileWith(ctx, h, restored)
}

// ReconcileWith is Reconcile with the log's history read already (from
// the whole log, verified).
func (s *Service) ReconcileWith(ctx context.Context, h *History, restored bool) error {
	st, err := s.store.View(ctx)
	if err != nil {
		return err
	}
	behind := ""
	switch last := st.LastChange; {
	case last == h.head || h.pending[last]:
	case last == "":
		behind = fmt.Sprintf("the store holds no registry change, but its audit log shows change %s committed", h.head)
	case !h.seen[last]:
		behind = fmt.Sprintf("the store's last change %s is not in its audit log, which shows change %s committed last: the store is not this log's", last, orNone(h.head))
	default:
		behind = fmt.Sprintf("the store's last change is %s, but its audit log shows change %s committed after it", last, orNone(h.head))
	}
	if behind != "" {
		if !restored {
			return fmt.Errorf("%w: %s. The store was restored from a backup, rebuilt, or damaged. If it was restored on purpose, start with --restored: the changes after its last one are then gone for good, and SPI counters are raised from the log so that no key and nonce repeat; otherwise restore the latest backup (docs/OPERATIONS.md, \"Back up and restore\")", ErrStoreBehind, behind)
		}
		s.log.Warn("the store is behind its audit log; serving it as restored (--restored)", "reason", behind)
		if err := s.audit.Append(audit.Entry{Caller: "keyserver", Role: string(ca.RoleKeyserver), RPC: rpcRestore, Decision: audit.Allow, Follows: st.LastChange,
			Reason: "store restored (--restored): " + behind + "; the changes after " + orNone(st.LastChange) + " are void"}); err != nil {
			return err
		}
	}
	var raised []string
	if _, err := s.store.Update(ctx, func(st *registry.State) error {
		raised = raised[:0]
		for k, next := range h.leased {
			if gs, ok := st.Generation(registry.NewPair(k.i, k.j)); ok && k.g+1 < gs.Current {
				continue // a key never accepted again
			}
			if st.RaiseSPILease(k.i, k.j, k.k, k.g, next) {
				raised = append(raised, fmt.Sprintf("SK(%d,%d,%d,%d) to %d", k.i, k.j, k.k, k.g, next))
			}
		}
		if len(raised) == 0 {
			return errNothing
		}
		return nil
	}); err != nil && !errors.Is(err, errNothing) {
		return fmt.Errorf("keyserver: raising SPI counters to the audit log's leases: %w", err)
	}
	if len(raised) > 0 {
		sort.Strings(raised)
		reason := fmt.Sprintf("SPI counters raised to the leases the audit log shows (the store was behind them): %d counters", len(raised))
		s.log.Warn("SPI counters raised to the audit log's leases: the store was behind them (restored, rebuilt or damaged)", "counters", len(raised), "first", raised[0])
		if err := s.audit.Append(audit.Entry{Caller: "keyserver", Role: string(ca.RoleKeyserver), RPC: "start", Decision: audit.Allow, Reason: reason}); err != nil {
			return err
		}
	}
	return nil
}

// errNothing aborts an update that has nothing to write.
var errNothing = errors.New("nothing to change")

func orNone(s string) string {
	if s == "" {
		return "the empty registry"
	}
	return s
}
