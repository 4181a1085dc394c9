package cli

import (
	"fmt"
	"strings"

	"github.com/enclavekeys/enclave/internal/api"
	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/visibility"
)

// printPreview prints a dry run: what the change would answer, who would
// gain and lose sight of which pairs, and the rotations it would cause.
func printPreview(streams IO, l keys.Layout, reply *api.PreviewReply) error {
	if len(reply.GetBroken()) > 0 {
		fmt.Fprintf(streams.Out, "dry run of %s, nothing changed; it would be refused (below), else it would answer: %s\n", reply.GetRpc(), reply.GetMessage())
	} else {
		fmt.Fprintf(streams.Out, "dry run of %s, nothing changed; it would answer: %s\n", reply.GetRpc(), reply.GetMessage())
	}
	if err := visibility.CompareStatus(reply.GetBefore(), reply.GetAfter()).Text(streams.Out); err != nil {
		return failed(err)
	}
	if len(reply.GetRotations()) > 0 {
		fmt.Fprintln(streams.Out, "rotations it would cause, as the change would report them:")
		printRotations(streams, l, reply.GetRotations())
	}
	return refusedFor(reply.GetBroken())
}

// refusedFor fails a dry run whose change would break sight assertions
// (it would be refused), naming each and the reader that breaks it.
func refusedFor(broken []string) error {
	if len(broken) == 0 {
		return nil
	}
	return failed(fmt.Errorf("it would be refused: it would break %s (enclave admin assert check lists the assertions)", strings.Join(broken, "; ")))
}
