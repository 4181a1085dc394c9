package cli

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/enclavekeys/enclave/internal/audit"
	"github.com/enclavekeys/enclave/internal/echo"
	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/registry"
	"github.com/enclavekeys/enclave/internal/store"
	"github.com/enclavekeys/enclave/internal/visibility"
)

func newAuditCmd(streams IO) *cobra.Command {
	cmd := &cobra.Command{Use: "audit", Short: "Check the key service's audit log"}
	var etcd, storePath, kekFile string
	verify := &cobra.Command{
		Use:   "verify (FILE [--store FILE] | --etcd URL[,URL]) [--kek-file F]",
		Short: "Verify the hash chain of an audit log",
		Long: `Check every line of an audit log (a file, or the log a key service keeps in
etcd): each must be an exact, well-formed entry whose sequence number follows
the one before and whose hash chains to it. Prints "OK" with the entry count,
or names the first line that was edited, removed, added or moved, and exits 1.

The chain alone cannot show lines cut from the end or a log rewritten and
re-hashed. The key service keeps the head of the log, under a MAC of the KEK,
in its store (a file log) or beside the entries (etcd); give --store (with
the KEK: --kek-file or ENCLAVE_KEK) to check a file log against it. A bbolt
store can be read only while its key server is stopped. In etcd the head is
always checked, so --etcd needs the KEK.`,
		RunE: func(cmd *cobra.Command, args []string) error {
			switch {
			case etcd != "" && len(args) == 0 && storePath == "":
				return verifyEtcdAudit(streams, etcd, kekFile)
			case etcd == "" && len(args) == 1:
				return verifyFileAudit(streams, args[0], storePath, kekFile)
			}
			return usagef("give an audit log FILE (with --store for its anchor) or --etcd URL[,URL]")
		},
	}
	verify.Flags().StringVar(&etcd, "etcd", "", "read the log from the key service's etcd")
	verify.Flags().StringVar(&storePath, "store", "", "the key service's store file: check the log against the head anchored there")
	verify.Flags().StringVar(&kekFile, "kek-file", "", "the key-encryption key file (else $ENCLAVE_KEK), for --store and --etcd")
	cmd.AddCommand(verify, newAuditReadersCmd(streams))
	return cmd
}

func newAuditReadersCmd(streams IO) *cobra.Command {
	var etcd, kekFile, storePath, pairText, atText string
	var asJSON bool
	var layout layoutFlag
	var af assertionFlags
	cmd := &cobra.Command{
		Use:   "readers --pair I-J [--at TIME | --never --reader R | --only --readers R[,R] | --always --reader R] (FILE [--store FILE] | --etcd URL[,URL]) [--kek-file F] [--json]",
		Short: "Replay the audit log: who could read a pair's traffic at a moment",
		Long: `Answer from the key service's audit log who could read the traffic of
pair I-J at a moment (--at, RFC 3339, as 2026-12-02T14:00:00Z; default now):
every registry change records the sight it gave and took (who gains and
who loses read access to which pairs, by which right), and this replays
them in order up to that moment. Changes the log marks as not committed
are left out. The log is verified as it is read; a broken chain stops the
replay with the line that breaks it.

How far the answer can be trusted is said with it. Alone, a file log is
checked as a chain, which anyone who can write the file can extend; with
--store and the KEK (--kek-file or ENCLAVE_KEK) its entries' MACs under
the KEK and the head anchored in the store are checked too, so that only
the key service can have written what the answer rests on. A moment
before the log began has no answer.

The answer covers the changes made since the log began recording sight;
older changes are counted and said. For now it equals what enclave map
shows for the pair (without --flows: the SAs' own parties are not
registry rights).

With a sight assertion (--never, --only or --always, as enclave admin
assert takes them) it answers instead whether the assertion was ever
broken, and when: the spans in which the log's readers broke it, and the
spans in which the registry kept it. A break while it was kept is what the
key service refuses; if the log shows one, the command says so and exits 1.`,
		Example: `  enclave audit readers --pair 3-7 --at 2026-12-02T14:00:00Z audit.log
  enclave audit readers --never --reader gw2 --pair 1-2 audit.log --store store.db --kek-file kek`,
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			p, err := registry.ParsePairIn(layout.l, pairText)
			if err != nil {
				return usagef("--pair: want one pair I-J (%v)", err)
			}
			key := registry.PairName(layout.l, p) // as the map names it: dotted under a layout
			at := time.Now()
			if atText != "" {
				if at, err = time.Parse(time.RFC3339, atText); err != nil {
					return usagef("--at %q: want RFC 3339 time, as 2026-12-02T14:00:00Z", echo.Cut(atText))
				}
			}
			r := visibility.NewReplay()
			var verified string
			switch {
			case etcd != "" && len(args) == 0 && storePath == "":
				res, err := walkEtcdAudit(etcd, kekFile, r.Add)
				if err != nil {
					return err
				}
				verified = fmt.Sprintf("the chain, the MACs of %d entries under the KEK, and the head recorded in etcd", res.Keyed)
			case etcd == "" && len(args) == 1:
				f, err := os.Open(args[0])
				if err != nil {
					return usageError(err)
				}
				defer f.Close()
				var res audit.Result
				if storePath != "" {
					head, keyer, closeStore, err := anchorOf(storePath, kekFile)
					if err != nil {
						return err
					}
					defer closeStore()
					res, err = audit.VerifyAnchoredKeyed(f, head, keyer, r.Add)
					if err != nil && !errors.Is(err, audit.ErrTornEnd) {
						return auditFailed(args[0], res, err)
					}
					verified = fmt.Sprintf("the chain, the MACs of %d entries under the KEK, and the head anchored in the store (entry %d)", res.Keyed, head.Seq)
				} else {
					res, err = audit.Walk(f, r.Add)
					if err != nil && !errors.Is(err, audit.ErrTornEnd) {
						return auditFailed(args[0], res, err)
					}
					verified = "the chain only: anyone who can write the file could have extended it (give --store and the KEK to check its MACs and anchor)"
				}
				if errors.Is(err, audit.ErrTornEnd) {
					// A live log: its last line is being written. The
					// entries before it are whole and verified.
					fmt.Fprintf(streams.Err, "note: the log's last line (%d) is incomplete (being written?): the answer stops at entry %d\n", res.Entries+1, res.Entries)
				}
			default:
				return usagef("give an audit log FILE (with --store for its anchor) or --etcd URL[,URL]")
			}
			if r.First.IsZero() || at.Before(r.First) {
				begins := "is empty"
				if !r.First.IsZero() {
					begins = "begins at " + r.First.UTC().Format(time.RFC3339)
				}
				return failed(fmt.Errorf("no answer for %s: the log %s, and nothing is known before it", at.UTC().Format(time.RFC3339), begins))
			}
			if r.Dotted() && layout.l.IsDefault() {
				return usagef("the log names sub-enclave pairs (as 3.2-7): give the org's layout, --layout (enclave admin status says it, e.g. 8.8)")
			}
			if p := r.Unreadable(layout.l); p != "" {
				return usagef("the log names pair %s, which does not read under --layout %s: give the org's layout (enclave admin status says it)", echo.Cut(p), layout.l)
			}
			if af.given() {
				af.pairText = pairText
				return assertionHistory(streams, r, layout.l, &af, verified, asJSON)
			}
			readers := r.At(at)[key]
			if asJSON {
				b, err := json.MarshalIndent(struct {
					Pair       string              `json:"pair"`
					At         time.Time           `json:"at"`
					Readers    []visibility.Reader `json:"readers"`
					Unrecorded int                 `json:"unrecorded_changes"`
					Verified   string              `json:"verified"`
				}{key, at.UTC(), append([]visibility.Reader{}, readers...), r.Unrecorded, verified}, "", "  ")
				if err != nil {
					return failed(err)
				}
				fmt.Fprintln(streams.Out, string(b))
				return nil
			}
			fmt.Fprintf(streams.Out, "who could read pair %s at %s:\n", key, at.UTC().Format(time.RFC3339))
			if len(readers) == 0 {
				fmt.Fprintln(streams.Out, "  nobody (no allowed pair, or nothing recorded yet)")
			}
			for _, rd := range readers {
				fmt.Fprintf(streams.Out, "  %s (%s): %s\n", rd.Device, rd.Role, rd.Right)
			}
			fmt.Fprintf(streams.Out, "verified: %s\n", verified)
			if r.Unrecorded > 0 {
				fmt.Fprintf(streams.Out, "note: %d changes in the log are from before it recorded sight; the answer leaves out what they did\n", r.Unrecorded)
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&pairText, "pair", "", "the pair I-J, or a sub-pair (3.1-7.2, with --layout)")
	cmd.Flags().Var(&layout, "layout", "the org's enclave layout (enclave admin status says it), for dotted ids")
	cmd.Flags().StringVar(&atText, "at", "", "the moment, RFC 3339 (default: now)")
	cmd.Flags().StringVar(&etcd, "etcd", "", "read the log from the key service's etcd")
	cmd.Flags().StringVar(&storePath, "store", "", "the key service's store file: check the log's MACs and its anchored head (with the KEK)")
	cmd.Flags().StringVar(&kekFile, "kek-file", "", "the key-encryption key file (else $ENCLAVE_KEK), for --store and --etcd")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	af.registerKinds(cmd)
	return cmd
}

// assertionHistory prints what the replayed log says of the assertion the
// flags name: when it was kept, and when the readers broke it.
func assertionHistory(streams IO, r *visibility.Replay, l keys.Layout, af *assertionFlags, verified string, asJSON bool) error {
	aa, err := af.build(l)
	if err != nil {
		return usageError(err)
	}
	a := registry.Assertion{Kind: aa.GetKind(), Reader: aa.GetReader(), Readers: aa.GetReaders(),
		Pair: registry.NewPair(keys.EnclaveID(aa.GetPair().GetA()), keys.EnclaveID(aa.GetPair().GetB()))}.Normal()
	h := r.History(l, a)
	whileKept := slices.ContainsFunc(h.Broken, func(b visibility.Breach) bool { return b.WhileKept })
	if asJSON {
		b, err := json.MarshalIndent(struct {
			visibility.AssertionHistory
			Unrecorded int    `json:"unrecorded_changes"`
			Verified   string `json:"verified"`
		}{h, r.Unrecorded, verified}, "", "  ")
		if err != nil {
			return failed(err)
		}
		fmt.Fprintln(streams.Out, string(b))
	} else {
		span := func(s visibility.Span) string {
			until := "the log's end (" + r.Last.UTC().Format(time.RFC3339) + ")"
			if !s.Until.IsZero() {
				until = s.Until.UTC().Format(time.RFC3339)
			}
			return s.From.UTC().Format(time.RFC3339) + " until " + until
		}
		fmt.Fprintf(streams.Out, "assertion %s\n", h.Assertion)
		if len(h.Kept) == 0 {
			fmt.Fprintln(streams.Out, "kept: never, in this log")
		}
		for _, k := range h.Kept {
			fmt.Fprintf(streams.Out, "kept: %s\n", span(k))
		}
		if len(h.Broken) == 0 {
			fmt.Fprintln(streams.Out, "broken: never, in this log")
		}
		for _, b := range h.Broken {
			while := "while not kept"
			if b.WhileKept {
				while = "WHILE KEPT"
			}
			fmt.Fprintf(streams.Out, "broken %s: %s\n", while, span(b.Span))
			for _, w := range b.Why {
				fmt.Fprintf(streams.Out, "  %s\n", w)
			}
		}
		fmt.Fprintf(streams.Out, "verified: %s\n", verified)
		if r.Unrecorded > 0 {
			fmt.Fprintf(streams.Out, "note: %d changes in the log are from before it recorded sight; the answer leaves out what they did\n", r.Unrecorded)
		}
	}
	if whileKept {
		return failed(fmt.Errorf("the log shows assertion %s broken while the registry kept it", h.Assertion))
	}
	return nil
}

// walkEtcdAudit verifies the log a key service keeps in etcd and gives
// each entry to each.
func walkEtcdAudit(endpoints, kekFile string, each func(audit.Entry)) (audit.Result, error) {
	var res audit.Result
	err := withEtcdAudit(endpoints, kekFile, func(ctx context.Context, a *store.EtcdAudit) error {
		var err error
		if res, err = a.Walk(ctx, each); err != nil {
			return auditFailed("etcd audit log", res, err)
		}
		return nil
	})
	return res, err
}

// anchorOf opens a key service's store (stopped) with the KEK and returns
// the head anchored there, the log's keyer, and a function closing it.
func anchorOf(storePath, kekFile string) (audit.Head, audit.Keyer, func(), error) {
	kek, err := store.LoadKEK(kekFile)
	if err != nil {
		return audit.Head{}, nil, nil, usageError(err)
	}
	if !exists(storePath) {
		return audit.Head{}, nil, nil, usagef("--store %s: no such file", storePath)
	}
	bs, err := store.OpenBolt(storePath, kek)
	if err != nil {
		return audit.Head{}, nil, nil, failed(err)
	}
	head, ok, err := bs.LoadHead()
	if err != nil {
		bs.Close()
		return audit.Head{}, nil, nil, failed(err)
	}
	if !ok {
		head = audit.GenesisHead()
	}
	return head, kek.AuditKeyer(), func() { bs.Close() }, nil
}

// verifyFileAudit checks a file log, against its anchor when a store is
// given.
func verifyFileAudit(streams IO, path, storePath, kekFile string) error {
	f, err := os.Open(path)
	if err != nil {
		return usageError(err)
	}
	defer f.Close()
	if storePath == "" {
		res, err := audit.Verify(f)
		if err != nil {
			return auditFailed(path, res, err)
		}
		fmt.Fprintf(streams.Out, "OK: %d entries, chain head %s (not checked against the store's anchor, nor the MACs of its %d keyed entries: give --store and the KEK to find lines cut from the end or added by anyone but the key service)\n", res.Entries, res.Head, res.Keyed)
		return nil
	}
	head, keyer, closeStore, err := anchorOf(storePath, kekFile)
	if err != nil {
		return err
	}
	defer closeStore()
	res, err := audit.VerifyAnchoredKeyed(f, head, keyer, nil)
	if err != nil {
		return auditFailed(path, res, err)
	}
	fmt.Fprintf(streams.Out, "OK: %d entries, chain head %s, reaching the store's anchor (entry %d); the MACs of %d entries verify under the KEK\n", res.Entries, res.Head, head.Seq, res.Keyed)
	return nil
}

// verifyEtcdAudit checks the log a key service keeps in etcd.
func verifyEtcdAudit(streams IO, endpoints, kekFile string) error {
	return withEtcdAudit(endpoints, kekFile, func(ctx context.Context, a *store.EtcdAudit) error {
		res, err := a.Verify(ctx)
		if err != nil {
			return auditFailed("etcd audit log", res, err)
		}
		fmt.Fprintf(streams.Out, "OK: %d entries, chain head %s, matching the recorded head\n", res.Entries, res.Head)
		return nil
	})
}

// withEtcdAudit opens the audit log a key service keeps in etcd (with the
// KEK, for its head) and runs f on it within 30 s.
func withEtcdAudit(endpoints, kekFile string, f func(ctx context.Context, a *store.EtcdAudit) error) error {
	kek, err := store.LoadKEK(kekFile)
	if err != nil {
		return usageError(err)
	}
	es, err := store.OpenEtcd(strings.Split(endpoints, ","), "", kek)
	if err != nil {
		return failed(err)
	}
	defer es.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	return f(ctx, store.NewEtcdAudit(es, nil))
}

// auditFailed reports the first bad line, and how much before it held.
func auditFailed(name string, res audit.Result, err error) error {
	var ve *audit.VerifyError
	if errors.As(err, &ve) {
		intact := "no entries before it are intact"
		if n := min(res.Entries, ve.Line-1); n > 0 {
			intact = fmt.Sprintf("the %d entries before it are intact", n)
		}
		return failed(fmt.Errorf("%s: FAILED at line %d: %s (%s)", name, ve.Line, ve.Reason, intact))
	}
	return failed(err)
}
