package cli

import (
	"fmt"

	"github.com/enclavekeys/enclave/internal/api"
	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/visibility"
)

// printPreview prints a dry run: what the change would answer, who would
// gain and lose sight of which pairs, and the rotations it would cause.
func printPreview(streams IO, l keys.Layout, reply *api.PreviewReply) error {
	fmt.Fprintf(streams.Out, "dry run of %s, nothing changed; it would answer: %s\n", reply.GetRpc(), reply.GetMessage())
	if err := visibility.CompareStatus(reply.GetBefore(), reply.GetAfter()).Text(streams.Out); err != nil {
		return failed(err)
	}
	if len(reply.GetRotations()) > 0 {
		fmt.Fprintln(streams.Out, "rotations it would cause, as the change would report them:")
		printRotations(streams, l, reply.GetRotations())
	}
	return refusedFor(streams, reply.GetBroken())
}

// refusedFor says which sight assertions a dry run's change would break
// (it would be refused), and fails then.
func refusedFor(streams IO, broken []string) error {
	if len(broken) == 0 {
		return nil
	}
	fmt.Fprintln(streams.Out, "it would be refused: it breaks these sight assertions:")
	for _, b := range broken {
		fmt.Fprintln(streams.Out, "  "+b)
	}
	return failed(fmt.Errorf("the change would break %d sight assertions (enclave admin assert check lists them)", len(broken)))
}
