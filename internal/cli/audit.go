package cli

import (
	"errors"
	"fmt"
	"os"

	"github.com/spf13/cobra"

	"github.com/enclavekeys/enclave/internal/audit"
)

func newAuditCmd(streams IO) *cobra.Command {
	cmd := &cobra.Command{Use: "audit", Short: "Check the key service's audit log"}
	cmd.AddCommand(&cobra.Command{
		Use:   "verify FILE",
		Short: "Verify the hash chain of an audit log",
		Long: `Check every line of an audit log: each must be an exact, well-formed entry
whose sequence number follows the one before and whose hash chains to it.
Prints "OK" with the entry count, or names the first line that was edited,
removed, added or moved, and exits 1.`,
		RunE: func(cmd *cobra.Command, args []string) error {
			if len(args) != 1 {
				return usagef("give exactly one audit log FILE")
			}
			f, err := os.Open(args[0])
			if err != nil {
				return failed(err)
			}
			defer f.Close()
			res, err := audit.Verify(f)
			var ve *audit.VerifyError
			if errors.As(err, &ve) {
				return failed(fmt.Errorf("%s: FAILED at line %d: %s (%d entries before it are intact)", args[0], ve.Line, ve.Reason, res.Entries))
			}
			if err != nil {
				return failed(err)
			}
			fmt.Fprintf(streams.Out, "OK: %d entries, chain head %s\n", res.Entries, res.Head)
			return nil
		},
	})
	return cmd
}
