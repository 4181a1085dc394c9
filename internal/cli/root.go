// Package cli holds the commands of the enclave binary.
//
// Exit status everywhere: 0 ok, 1 the operation failed or was refused, 2
// bad usage or bad input. Errors print as one line on stderr.
package cli

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"strings"

	"github.com/spf13/cobra"

	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/echo"
	"github.com/enclavekeys/enclave/internal/fileread"
)

// Exit codes of the enclave binary.
const (
	ExitOK     = 0
	ExitFailed = 1 // the operation failed or was refused
	ExitUsage  = 2 // bad usage or bad input
)

// exitError carries the exit code an error should end the process with.
type exitError struct {
	code int
	err  error
}

func (e *exitError) Error() string { return e.err.Error() }
func (e *exitError) Unwrap() error { return e.err }

// usageError marks err as bad usage or input (exit 2).
func usageError(err error) error { return &exitError{ExitUsage, err} }

// usagef is usageError with a formatted message.
func usagef(format string, a ...any) error { return usageError(fmt.Errorf(format, a...)) }

// failed marks err as a failed or refused operation (exit 1).
func failed(err error) error { return &exitError{ExitFailed, err} }

// fileError classifies an error from reading files the user named: a file
// that is missing, unreadable for its permissions or too large is bad input
// (exit 2), as a missing @keyfile is; anything else failed (exit 1).
func fileError(err error) error {
	if errors.Is(err, fs.ErrNotExist) || errors.Is(err, fs.ErrPermission) || errors.Is(err, fileread.ErrTooLarge) || errors.Is(err, ca.ErrPEM) {
		return usageError(err)
	}
	return failed(err)
}

// IO is where a command reads and writes; tests give buffers.
type IO struct {
	In       io.Reader
	Out, Err io.Writer
}

// Main runs the enclave command line with args (without the program name)
// and returns the exit status.
func Main(args []string, streams IO) int {
	root := newRoot(streams)
	root.SetArgs(args)
	err := root.Execute()
	if err == nil {
		return ExitOK
	}
	// One line, and no argument repeated at full length, whoever wrote
	// the message (cobra echoes unknown flags and commands whole).
	// No run of hex digits long enough to be a key is ever repeated.
	msg := echo.Redact(echo.Words(strings.ReplaceAll(err.Error(), "\n", " ")))
	fmt.Fprintf(streams.Err, "enclave: %s\n", msg)
	var ee *exitError
	if errors.As(err, &ee) {
		return ee.code
	}
	// Anything cobra itself reports (unknown command or flag, bad flag
	// value, wrong argument count) is a usage error.
	return ExitUsage
}

func newRoot(streams IO) *cobra.Command {
	root := &cobra.Command{
		Use:   "enclave",
		Short: "Hierarchical key management for secure network enclaves",
		Long: `enclave manages the keys of secure network enclaves: one org key derives a key
per pair of enclaves, a key per server and a key per security association,
so that any holder of a key decrypts exactly the traffic beneath it.`,
		SilenceErrors:     true,
		SilenceUsage:      true,
		CompletionOptions: cobra.CompletionOptions{DisableDefaultCmd: true},
		Version:           readBuildInfo().String(),
	}
	root.SetVersionTemplate("{{.Version}}\n")
	root.SetHelpTemplate(helpTemplate)
	root.SetIn(streams.In)
	root.SetOut(streams.Out)
	root.SetErr(streams.Err)
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return usageError(err) })
	root.AddCommand(newKeysCmd(streams), newPacketCmd(streams), newCACmd(streams), newCertCmd(streams), newAuditCmd(streams), newKeyserverCmd(streams), newAdminCmd(streams), newAgentCmd(streams), newGatewayCmd(streams), newOrgCmd(streams), newMapCmd(streams), newLabCmd(streams), newBenchCmd(streams), newVersionCmd(streams), newStatusCmd(streams), newJoinCmd(streams))
	groups(root)
	addExamples(root)
	return root
}

// Stdio is the process's own standard streams.
func Stdio() IO { return IO{In: os.Stdin, Out: os.Stdout, Err: os.Stderr} }

// noArgs refuses positional arguments with a usage error. The arguments are
// not repeated: a key typed without its flag would be.
func noArgs(cmd *cobra.Command, args []string) error {
	if len(args) > 0 {
		return usagef("%s takes no arguments, got %d (options are given as --flag VALUE)", cmd.CommandPath(), len(args))
	}
	return nil
}

// groups makes every command that only groups subcommands (admin, admin
// device, keys, ...) refuse a word that is not one of them with a usage
// error, where cobra would print help and exit 0; given no word at all,
// it prints its help.
// helpTemplate puts what an operator looks for first (issue 32): the
// command's one line, its usage and examples, its subcommands and flags;
// the longer explanation comes after, under About.
const helpTemplate = `{{with .Short}}{{. | trimTrailingWhitespaces}}

{{end}}Usage:{{if .Runnable}}
  {{.UseLine}}{{end}}{{if .HasAvailableSubCommands}}
  {{.CommandPath}} [command]{{end}}{{if .HasExample}}

Examples:
{{.Example}}{{end}}{{if .HasAvailableSubCommands}}

Commands:{{range .Commands}}{{if (or .IsAvailableCommand (eq .Name "help"))}}
  {{rpad .Name .NamePadding }} {{.Short}}{{end}}{{end}}{{end}}{{if .HasAvailableLocalFlags}}

Flags:
{{.LocalFlags.FlagUsages | trimTrailingWhitespaces}}{{end}}{{if .HasAvailableInheritedFlags}}

Global flags:
{{.InheritedFlags.FlagUsages | trimTrailingWhitespaces}}{{end}}{{if .Long}}

About:
{{.Long | trimTrailingWhitespaces}}{{end}}{{if .HasAvailableSubCommands}}

"{{.CommandPath}} [command] --help" tells more about a command.{{end}}
`

func groups(cmd *cobra.Command) {
	for _, sub := range cmd.Commands() {
		groups(sub)
	}
	if !cmd.HasSubCommands() || cmd.Runnable() || cmd == cmd.Root() {
		return
	}
	cmd.Args = cobra.ArbitraryArgs
	cmd.SuggestionsMinimumDistance = 2
	cmd.RunE = func(c *cobra.Command, args []string) error {
		if len(args) == 0 {
			return c.Help()
		}
		msg := fmt.Sprintf("unknown command %q for %q", echo.Cut(args[0]), c.CommandPath())
		if s := c.SuggestionsFor(args[0]); len(s) > 0 {
			msg += "; did you mean " + strings.Join(s, " or ") + "?"
		}
		return usagef("%s", msg)
	}
}
