package cli

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/grpc"

	"github.com/enclavekeys/enclave/internal/api"
	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/fileread"
	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/keyserver"
	"github.com/enclavekeys/enclave/internal/orgfile"
	"github.com/enclavekeys/enclave/internal/registry"
	"github.com/enclavekeys/enclave/internal/visibility"
)

// assertionFlags are the flags that name one sight assertion.
type assertionFlags struct {
	never, only, always       bool
	reader, pairText, readers string
}

// given reports whether any kind of assertion is named.
func (f *assertionFlags) given() bool { return f.never || f.only || f.always }

// register adds the flags to c.
func (f *assertionFlags) register(c *cobra.Command) {
	f.registerKinds(c)
	c.Flags().StringVar(&f.pairText, "pair", "", "the pair I-J (dotted under a sub-enclave layout: 3.2-7.1)")
}

// registerKinds adds the flags but --pair to c.
func (f *assertionFlags) registerKinds(c *cobra.Command) {
	c.Flags().BoolVar(&f.never, "never", false, "READER never reads PAIR (at any level)")
	c.Flags().BoolVar(&f.only, "only", false, "only READERS may read PAIR (besides its servers and the key servers): at most these, maybe none")
	c.Flags().BoolVar(&f.always, "always", false, "READER keeps reading PAIR")
	c.Flags().StringVar(&f.reader, "reader", "", "a device name, or role:gateway, role:monitor, ...")
	c.Flags().StringVar(&f.readers, "readers", "", "with --only: NAME[,NAME] (devices, or role:ROLE)")
}

// build reads the flags as an assertion, pair ids under layout l.
func (f *assertionFlags) build(l keys.Layout) (*api.Assertion, error) {
	kinds := 0
	a := &api.Assertion{}
	for kind, on := range map[string]bool{registry.AssertNever: f.never, registry.AssertOnly: f.only, registry.AssertAlways: f.always} {
		if on {
			kinds++
			a.Kind = kind
		}
	}
	switch {
	case kinds != 1:
		return nil, fmt.Errorf("give one of --never, --only and --always")
	case f.pairText == "":
		return nil, fmt.Errorf("--pair is required")
	case f.only && (f.reader != "" || f.readers == ""):
		return nil, fmt.Errorf("--only takes --readers NAME[,NAME] (devices, or role:ROLE), not --reader")
	case !f.only && (f.reader == "" || f.readers != ""):
		return nil, fmt.Errorf("--%s takes one --reader (a device, or role:ROLE)", a.Kind)
	}
	p, err := registry.ParsePairIn(l, f.pairText)
	if err != nil {
		return nil, err
	}
	a.Pair, a.Reader = &api.Pair{A: uint32(p.A), B: uint32(p.B)}, f.reader
	if f.only {
		for _, r := range strings.Split(f.readers, ",") {
			a.Readers = append(a.Readers, strings.TrimSpace(r))
		}
	}
	return a, nil
}

// newAssertCmd is enclave admin assert: sight assertions (issue 34),
// guarantees about who can read a pair that the key service holds every
// change to.
func newAssertCmd(streams IO, cf *connFlags, submit func(func(keys.Layout) (*api.PreviewRequest, error)) error, withDryRun func(...*cobra.Command)) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "assert",
		Short: "Guarantees about who can read a pair, held by the key service on every change",
		Long: `A sight assertion is a guarantee about who can read a pair's traffic, kept in
the registry: the key service refuses every change that would break one,
whichever command makes it, and says which assertion and which reader.

  never   READER reads PAIR, at any level beneath it, by any right
  only    besides PAIR's own servers and the key servers, nobody but
          READERS reads PAIR (at any level beneath it); none of them must
  always  READER keeps reading PAIR

A reader is a device name or a role (role:gateway, role:monitor). An
assertion that does not hold now is not kept. Adding and removing one are
audited changes, and take --dry-run.`,
		Example: `  enclave admin assert add --never --reader gw2 --pair 1-2
  enclave admin assert add --only --pair 3-7 --readers gw-audit
  enclave admin assert add --always --reader soc --pair 2-3
  enclave admin assert check`,
	}
	var af assertionFlags
	build, flags := af.build, af.register
	change := func(verb, short string, req func(a *api.Assertion) *api.PreviewRequest) *cobra.Command {
		return &cobra.Command{
			Use: verb + " (--never --reader R | --only --readers R[,R] | --always --reader R) --pair I-J [--dry-run]", Short: short, Args: noArgs,
			Example: fmt.Sprintf(`  enclave admin assert %[1]s --never --reader gw2 --pair 1-2
  enclave admin assert %[1]s --only --pair 3-7 --readers gw-audit,soc --dry-run
  enclave admin assert %[1]s --always --reader role:monitor --pair 2-3`, verb),
			RunE: func(cmd *cobra.Command, _ []string) error {
				return submit(func(l keys.Layout) (*api.PreviewRequest, error) {
					a, err := build(l)
					return req(a), err
				})
			},
		}
	}
	add := change("add", "Keep a sight assertion (refused if it does not hold now)", func(a *api.Assertion) *api.PreviewRequest {
		return &api.PreviewRequest{Change: &api.PreviewRequest_AddAssertion{AddAssertion: &api.AssertionRequest{Assertion: a}}}
	})
	remove := change("remove", "Drop a sight assertion (an audited change)", func(a *api.Assertion) *api.PreviewRequest {
		return &api.PreviewRequest{Change: &api.PreviewRequest_RemoveAssertion{RemoveAssertion: &api.AssertionRequest{Assertion: a}}}
	})
	flags(add)
	flags(remove)
	withDryRun(add, remove)
	check := &cobra.Command{
		Use: "check", Short: "List the assertions and say whether each holds now (exit 1 if one is broken)", Args: noArgs,
		Example: `  enclave admin assert check`,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return cf.with(func(ctx context.Context, conn *grpc.ClientConn, _ *keyserver.Credentials) error {
				a := api.NewAdminClient(conn)
				l, err := adminLayout(ctx, a)
				if err != nil {
					return err
				}
				r, err := a.CheckAssertions(ctx, &api.CheckAssertionsRequest{})
				if err != nil {
					return rpcError(err)
				}
				st := &registry.State{}
				if !l.IsDefault() {
					st.EnclaveLayout = l.String()
				}
				for _, x := range r.GetAssertions() {
					fmt.Fprintln(streams.Out, st.Describe(registry.Assertion{Kind: x.GetKind(), Reader: x.GetReader(), Readers: x.GetReaders(),
						Pair: registry.NewPair(keys.EnclaveID(x.GetPair().GetA()), keys.EnclaveID(x.GetPair().GetB()))}))
				}
				if len(r.GetAssertions()) == 0 {
					fmt.Fprintln(streams.Out, "no assertions")
				}
				for _, b := range r.GetBroken() {
					fmt.Fprintln(streams.Out, "BROKEN: "+b)
				}
				if len(r.GetBroken()) > 0 {
					return failed(fmt.Errorf("%d ways an assertion is broken", len(r.GetBroken())))
				}
				if len(r.GetAssertions()) > 0 {
					fmt.Fprintln(streams.Out, "every assertion holds")
				}
				return nil
			})
		},
	}
	cmd.AddCommand(add, remove, check)
	return cmd
}

// newExportCmd is enclave admin export: the live registry as the org file
// (internal/orgfile), for review and version control.
func newExportCmd(streams IO, cf *connFlags) *cobra.Command {
	var out string
	cmd := &cobra.Command{
		Use:   "export [--out FILE]",
		Short: "Write the registry as the organisation file (YAML, no secrets)",
		Long: `Write the live registry as the organisation file: the enclave layout,
enclaves and sub-enclaves, pair rules, devices (role, enclave, server id,
address, revoked), grants and sight assertions, ids
dotted as operators type them. The same registry gives the same bytes, so
the file diffs cleanly in version control. Keys and join tokens are never
in it, nor certificate pins (renewals move them); removed devices are
left out, and devices awaiting or confirming their join are in.
Apply one with enclave admin apply.`,
		Example: `  enclave admin export --out org.yaml && git diff org.yaml`,
		Args:    noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return cf.with(func(ctx context.Context, conn *grpc.ClientConn, _ *keyserver.Credentials) error {
				st, err := api.NewAdminClient(conn).Status(ctx, &api.StatusRequest{})
				if err != nil {
					return rpcError(err)
				}
				f, err := orgfile.FromStatus(st)
				if err != nil {
					return failed(err)
				}
				raw, err := orgfile.Marshal(f)
				if err != nil {
					return failed(err)
				}
				if out == "" {
					_, err = streams.Out.Write(raw)
					return err
				}
				if err := os.WriteFile(out, raw, 0o644); err != nil {
					return fileError(fmt.Errorf("--out: %w", err))
				}
				fmt.Fprintf(streams.Out, "organisation written to %s (%d enclaves, %d devices, %d assertions)\n", out, len(f.Enclaves), len(f.Devices), len(f.Assertions))
				return nil
			})
		},
	}
	cmd.Flags().StringVar(&out, "out", "", "write to this file (default: standard output)")
	return cmd
}

// newApplyCmd is enclave admin apply: make the registry what an
// organisation file says, as one audited change, or print the plan.
func newApplyCmd(streams IO, cf *connFlags) *cobra.Command {
	var dry bool
	var ttl time.Duration
	var tokensOut string
	cmd := &cobra.Command{
		Use:   "apply FILE [--dry-run]",
		Short: "Make the registry what an organisation file says (one audited change, or nothing)",
		Long: `Make the registry what an organisation file (enclave admin export) says:
enclaves added, devices added or revoked (a device left out of the file is
revoked), pair rules, grants and sight assertions made exactly the file's,
as one audited change: either all of it is committed or nothing is. Each
step checks, rotates and records sight as its own command does, and the
result is held to the sight assertions. A device the file adds without a
fingerprint (a server, client, gateway or monitor) is registered awaiting
its host, and its join token is printed once. --dry-run prints the plan,
who would gain and lose sight of which pairs, the rotations and the sight
assertions the file would break, and changes nothing (exit 1 if it would
be refused). A file cannot remove or rename an enclave, change a device's
role, enclave, server id, address or pinned certificate, or reinstate a
revoked device: such a file is refused with the reason.`,
		Example: `  enclave admin export --out org.yaml
  $EDITOR org.yaml && git diff org.yaml
  enclave admin apply org.yaml --dry-run
  enclave admin apply org.yaml`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			raw, err := fileread.Bounded(args[0], orgFileMax)
			if err != nil {
				return fileError(err)
			}
			if _, err := orgfile.Parse(raw); err != nil {
				return usageError(err)
			}
			// The tokens' directory is made before anything changes, so
			// that a token is never made with nowhere to go.
			if tokensOut != "" && !dry {
				if err := os.MkdirAll(tokensOut, 0o700); err != nil {
					return usageError(fmt.Errorf("--tokens-out: %w", err))
				}
			}
			return cf.with(func(ctx context.Context, conn *grpc.ClientConn, creds *keyserver.Credentials) error {
				a := api.NewAdminClient(conn)
				lay, err := adminLayout(ctx, a)
				if err != nil {
					return err
				}
				r, err := api.ApplyOrgFile(ctx, a, &api.ApplyOrgRequest{File: raw, DryRun: dry, TokenTtlSeconds: uint32(ttl / time.Second)})
				if err != nil {
					return rpcError(err)
				}
				if dry {
					fmt.Fprintln(streams.Out, "dry run, nothing changed; the plan:")
				}
				for _, line := range r.GetPlan() {
					fmt.Fprintln(streams.Out, "  "+line)
				}
				fmt.Fprintln(streams.Out, r.GetMessage())
				if dry {
					if err := visibility.CompareStatus(r.GetBefore(), r.GetAfter()).Text(streams.Out); err != nil {
						return failed(err)
					}
				}
				printRotations(streams, lay, r.GetRotations())
				if err := giveTokens(streams, r.GetTokens(), tokensOut, cf.keyserver, ca.Fingerprint(creds.Roots.Certs()[0])); err != nil {
					return err
				}
				return refusedFor(r.GetBroken())
			})
		},
	}
	cmd.Flags().BoolVar(&dry, "dry-run", false, "change nothing: print the plan, who would gain and lose sight, the rotations, and the sight assertions it would break")
	cmd.Flags().DurationVar(&ttl, "token-ttl", 0, "how long the join tokens of the devices the file adds live (default 1h, at most 168h)")
	cmd.Flags().StringVar(&tokensOut, "tokens-out", "", "write each join token to DIR/NAME.token (mode 0600; DIR made 0700) instead of standard output (for CI, whose logs must not hold them)")
	return cmd
}

// orgFileMax bounds the organisation file apply reads (the key service's
// own bound).
const orgFileMax = keyserver.MaxOrgFileBytes

// giveTokens gives the join tokens of the devices an apply added, once:
// each into dir/NAME.token if dir is given (a token whose file cannot be
// made new is not shown at all: it fails, saying how to make another),
// else to standard output; with the command each host joins with.
func giveTokens(streams IO, tokens []*api.ApplyOrgToken, dir, keyservice, caFingerprint string) error {
	if len(tokens) == 0 {
		return nil
	}
	var failedTokens []string
	fmt.Fprintln(streams.Out, "join tokens of the devices added, given this once:")
	for _, t := range tokens {
		until := t.GetExpires().AsTime().UTC().Format(time.RFC3339)
		if dir != "" {
			path := filepath.Join(dir, t.GetDevice()+".token")
			err := ca.WriteNew(dir, t.GetDevice()+".token", []byte(t.GetToken()+"\n"), 0o600)
			if err == nil {
				fmt.Fprintf(streams.Out, "  %s: %s (until %s)\n", t.GetDevice(), path, until)
				continue
			}
			// Never into the output (a CI log): the token is lost, and
			// a new one replaces it.
			failedTokens = append(failedTokens, t.GetDevice())
			fmt.Fprintf(streams.Err, "%s: %v: its token is not shown; make another: enclave admin token create --name %s (with its role, enclave, server id)\n", path, err, t.GetDevice())
			continue
		}
		fmt.Fprintf(streams.Out, "  %s: %s (until %s)\n", t.GetDevice(), t.GetToken(), until)
	}
	fmt.Fprintf(streams.Out, "on each new host (its token file there, as root):\n  enclave join --keyserver %s --token-file NAME.token --ca-fingerprint %s --dir /etc/enclave\n", keyservice, caFingerprint)
	if len(failedTokens) > 0 {
		return failed(fmt.Errorf("applied, but the join tokens of %s could not be written (above)", strings.Join(failedTokens, ", ")))
	}
	return nil
}
