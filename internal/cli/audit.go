package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/enclavekeys/enclave/internal/audit"
	"github.com/enclavekeys/enclave/internal/store"
)

func newAuditCmd(streams IO) *cobra.Command {
	cmd := &cobra.Command{Use: "audit", Short: "Check the key service's audit log"}
	var etcd string
	verify := &cobra.Command{
		Use:   "verify (FILE | --etcd URL[,URL])",
		Short: "Verify the hash chain of an audit log",
		Long: `Check every line of an audit log (a file, or the log a key service keeps in
etcd): each must be an exact, well-formed entry whose sequence number follows
the one before and whose hash chains to it. Prints "OK" with the entry count,
or names the first line that was edited, removed, added or moved, and exits 1.`,
		RunE: func(cmd *cobra.Command, args []string) error {
			var r io.Reader
			name := ""
			switch {
			case etcd != "" && len(args) == 0:
				es, err := store.OpenEtcd(strings.Split(etcd, ","), "")
				if err != nil {
					return failed(err)
				}
				defer es.Close()
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				defer cancel()
				if r, err = store.NewEtcdAudit(es, nil).Reader(ctx); err != nil {
					return failed(err)
				}
				name = "etcd audit log"
			case etcd == "" && len(args) == 1:
				f, err := os.Open(args[0])
				if err != nil {
					return failed(err)
				}
				defer f.Close()
				r, name = f, args[0]
			default:
				return usagef("give an audit log FILE or --etcd URL[,URL]")
			}
			res, err := audit.Verify(r)
			var ve *audit.VerifyError
			if errors.As(err, &ve) {
				return failed(fmt.Errorf("%s: FAILED at line %d: %s (%d entries before it are intact)", name, ve.Line, ve.Reason, res.Entries))
			}
			if err != nil {
				return failed(err)
			}
			fmt.Fprintf(streams.Out, "OK: %d entries, chain head %s\n", res.Entries, res.Head)
			return nil
		},
	}
	verify.Flags().StringVar(&etcd, "etcd", "", "read the log from the key service's etcd")
	cmd.AddCommand(verify)
	return cmd
}
