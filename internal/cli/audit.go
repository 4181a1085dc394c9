package cli

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/enclavekeys/enclave/internal/audit"
	"github.com/enclavekeys/enclave/internal/store"
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
	cmd.AddCommand(verify)
	return cmd
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
		fmt.Fprintf(streams.Out, "OK: %d entries, chain head %s (not checked against the store's anchor: give --store to find lines cut from the end)\n", res.Entries, res.Head)
		return nil
	}
	kek, err := store.LoadKEK(kekFile)
	if err != nil {
		return usageError(err)
	}
	if !exists(storePath) {
		return usagef("--store %s: no such file", storePath)
	}
	bs, err := store.OpenBolt(storePath, kek)
	if err != nil {
		return failed(err)
	}
	defer bs.Close()
	head, ok, err := bs.LoadHead()
	if err != nil {
		return failed(err)
	}
	if !ok {
		head = audit.GenesisHead()
	}
	res, err := audit.VerifyAnchored(f, head)
	if err != nil {
		return auditFailed(path, res, err)
	}
	fmt.Fprintf(streams.Out, "OK: %d entries, chain head %s, reaching the store's anchor (entry %d)\n", res.Entries, res.Head, head.Seq)
	return nil
}

// verifyEtcdAudit checks the log a key service keeps in etcd.
func verifyEtcdAudit(streams IO, endpoints, kekFile string) error {
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
	res, err := store.NewEtcdAudit(es, nil).Verify(ctx)
	if err != nil {
		return auditFailed("etcd audit log", res, err)
	}
	fmt.Fprintf(streams.Out, "OK: %d entries, chain head %s, matching the recorded head\n", res.Entries, res.Head)
	return nil
}

// auditFailed reports the first bad line, and how much before it held.
func auditFailed(name string, res audit.Result, err error) error {
	var ve *audit.VerifyError
	if errors.As(err, &ve) {
		intact := "no entries before it are intact"
		if res.Entries > 0 {
			intact = fmt.Sprintf("the %d entries before it are intact", res.Entries)
		}
		return failed(fmt.Errorf("%s: FAILED at line %d: %s (%s)", name, ve.Line, ve.Reason, intact))
	}
	return failed(err)
}
