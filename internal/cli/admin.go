package cli

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/enclavekeys/enclave/internal/api"
	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/keyserver"
	"github.com/enclavekeys/enclave/internal/registry"
)

// connFlags are how a client reaches the key service.
type connFlags struct {
	keyserver, serverName, ca, cert, key string
	timeout                              time.Duration
}

func (c *connFlags) register(cmd *cobra.Command) {
	fl := cmd.PersistentFlags()
	fl.StringVar(&c.keyserver, "keyserver", "", "the key service address, host:port")
	fl.StringVar(&c.serverName, "server-name", "", "the name in the key server's certificate (default: the host of --keyserver)")
	fl.StringVar(&c.ca, "ca", "", "the org CA certificate")
	fl.StringVar(&c.cert, "cert", "", "this device's certificate")
	fl.StringVar(&c.key, "key", "", "this device's private key")
	fl.DurationVar(&c.timeout, "timeout", 10*time.Second, "how long to wait for the key service (to come up, and to answer)")
}

// dial connects, or returns a usage error for missing flags and a failure
// for unreadable credentials.
func (c *connFlags) dial() (*grpc.ClientConn, *keyserver.Credentials, error) {
	if err := c.fromContext(); err != nil {
		return nil, nil, err
	}
	for name, v := range map[string]string{"keyserver": c.keyserver, "ca": c.ca, "cert": c.cert, "key": c.key} {
		if v == "" {
			return nil, nil, usagef("--%s is required (or ENCLAVE_%s, or %s in the admin context file %s: enclave org init writes one)", name, strings.ToUpper(name), name, adminContextPath())
		}
	}
	creds, err := keyserver.LoadCredentials(c.ca, c.cert, c.key)
	if err != nil {
		return nil, nil, fileError(err)
	}
	// Wait for a key server that is not up yet (just started, restarting)
	// up to --timeout, instead of failing at the first refused connection.
	// The answers of a large org (its status, an apply's plan and map
	// before and after) are larger than gRPC's default 4 MiB.
	conn, err := keyserver.Dial(c.keyserver, c.serverName, creds, grpc.WithDefaultCallOptions(grpc.WaitForReady(true), grpc.MaxCallRecvMsgSize(maxAdminReply)))
	if err != nil {
		return nil, nil, usageError(err)
	}
	return conn, creds, nil
}

// with dials the key service and runs f with a context bounded by
// --timeout; the connection is closed afterwards.
func (c *connFlags) with(f func(ctx context.Context, conn *grpc.ClientConn, creds *keyserver.Credentials) error) error {
	conn, creds, err := c.dial()
	if err != nil {
		return err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), c.timeout)
	defer cancel()
	// A certificate that does not match is said at once: waiting out
	// --timeout cannot mend it.
	if err := keyserver.Probe(ctx, c.keyserver, c.serverName, creds); errors.Is(err, keyserver.ErrTLSMismatch) {
		return failed(err)
	}
	return f(ctx, conn, creds)
}

// rpcError turns a gRPC error into the CLI's: a bad request is usage (2),
// anything refused or failed is 1. A key service that did not come up in
// time is said so plainly, with the last connection error.
// maxAdminReply bounds an answer of the key service to an admin tool.
const maxAdminReply = 256 << 20

func rpcError(err error) error {
	var done *exitError
	if errors.As(err, &done) { // already said, with its exit code (bad input found before the call)
		return err
	}
	st := status.Convert(err)
	msg := st.Message()
	switch st.Code() {
	case codes.InvalidArgument:
		return usageError(fmt.Errorf("%s", msg))
	case codes.Unavailable:
		return failed(fmt.Errorf("key service unavailable: %s", msg))
	case codes.DeadlineExceeded:
		last := strings.TrimPrefix(msg, "latest balancer error: ")
		return failed(fmt.Errorf("the key service did not answer within --timeout (%s)", last))
	}
	return failed(fmt.Errorf("%s (%s)", msg, st.Code()))
}

func newAdminCmd(streams IO) *cobra.Command {
	var cf connFlags
	cmd := &cobra.Command{
		Use:   "admin",
		Short: "Change the registry and policy of a key service (admin certificate)",
		Example: `  export ENCLAVE_CONTEXT=org/admin.yaml            # written by enclave org init
  enclave admin status
  enclave admin --keyserver 192.0.2.10:7443 --ca ca/ca.crt --cert certs/alice.crt --key certs/alice.key status`,
		Long: `Change and read the registry of a key service, as an admin.

The connection: --keyserver, --ca, --cert and --key; or ENCLAVE_KEYSERVER,
ENCLAVE_CA, ENCLAVE_CERT and ENCLAVE_KEY; or the admin context file,
$ENCLAVE_CONTEXT or ~/.config/enclave/admin.yaml (keyserver:, ca:, cert:,
key:; relative paths from the file's directory). Flags win, then the
environment.`,
	}
	cf.register(cmd)
	var lay keys.Layout // the org's, once asked: pairs are printed under it
	call := func(f func(ctx context.Context, a api.AdminClient) (*api.AdminReply, error)) error {
		return cf.with(func(ctx context.Context, conn *grpc.ClientConn, _ *keyserver.Credentials) error {
			reply, err := f(ctx, api.NewAdminClient(conn))
			if err != nil {
				return rpcError(err)
			}
			fmt.Fprintln(streams.Out, reply.GetMessage())
			printRotations(streams, lay, reply.GetRotations())
			return nil
		})
	}

	// submit makes a registry change, or with --dry-run asks the key
	// service what it would do and prints who would gain and lose sight
	// of which pairs.
	// The request is built under the org's layout, by which dotted
	// enclave ids read (the key service says which).
	var dryRun bool
	submit := func(build func(l keys.Layout) (*api.PreviewRequest, error)) error {
		var req *api.PreviewRequest
		withLayout := func(ctx context.Context, a api.AdminClient) error {
			l, err := adminLayout(ctx, a)
			if err != nil {
				return err
			}
			lay = l
			if req, err = build(l); err != nil {
				return usageError(err)
			}
			return nil
		}
		if !dryRun {
			return call(func(ctx context.Context, a api.AdminClient) (*api.AdminReply, error) {
				if err := withLayout(ctx, a); err != nil {
					return nil, err
				}
				return api.Apply(ctx, a, req)
			})
		}
		return cf.with(func(ctx context.Context, conn *grpc.ClientConn, _ *keyserver.Credentials) error {
			if err := withLayout(ctx, api.NewAdminClient(conn)); err != nil {
				return err
			}
			reply, err := api.NewAdminClient(conn).Preview(ctx, req)
			if err != nil {
				return rpcError(err)
			}
			return printPreview(streams, lay, reply)
		})
	}
	withDryRun := func(cmds ...*cobra.Command) {
		for _, c := range cmds {
			c.Flags().BoolVar(&dryRun, "dry-run", false, "change nothing: print who would gain and lose sight of which pairs, and which pairs would rotate")
		}
	}

	var encID enclaveFlag
	var encName, encAddresses, encNetwork string
	enclave := &cobra.Command{Use: "enclave", Short: "Manage enclaves"}
	enclaveAdd := &cobra.Command{
		Use: "add --id I --name N [--addresses PREFIX --network PREFIX]", Short: "Add an enclave (with a block its agents' overlay addresses are handed out from)", Args: noArgs,
		Example: `  enclave admin enclave add --id 3 --name web --addresses 100.64.3.0/24 --network 100.64.0.0/16
  enclave admin enclave add --id 3.2 --name db      # a sub-enclave of 3 (an org made with --enclave-layout 8.8)`,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if !encID.given() || encName == "" {
				return usagef("--id (1 to 65535, or dotted: 3.2) and --name are required")
			}
			return submit(func(l keys.Layout) (*api.PreviewRequest, error) {
				id, err := encID.in(l)
				return &api.PreviewRequest{Change: &api.PreviewRequest_AddEnclave{AddEnclave: &api.AddEnclaveRequest{Id: uint32(id), Name: encName, Addresses: encAddresses, Network: encNetwork}}}, err
			})
		},
	}
	enclaveAdd.Flags().Var(&encID, "id", "enclave id, 1 to 65535, or a sub-enclave's dotted by the org's layout (3.2: sub-enclave 2 of enclave 3)")
	enclaveAdd.Flags().StringVar(&encName, "name", "", "enclave name")
	addressFlags := func(c *cobra.Command) {
		c.Flags().StringVar(&encAddresses, "addresses", "", "the block its agents' overlay addresses are handed out from, e.g. 100.64.3.0/24")
		c.Flags().StringVar(&encNetwork, "network", "", "the overlay network their certificates name (its prefix length is theirs), e.g. 100.64.0.0/16")
	}
	addressFlags(enclaveAdd)
	enclaveAddresses := &cobra.Command{
		Use: "addresses --id I (--addresses PREFIX --network PREFIX | --by-hand)", Short: "Give an enclave a block of overlay addresses to hand out, or take it away", Args: noArgs,
		Example: `  enclave admin enclave addresses --id 3 --addresses 100.64.3.0/24 --network 100.64.0.0/16`,
		RunE: func(cmd *cobra.Command, _ []string) error {
			byHand, _ := cmd.Flags().GetBool("by-hand")
			switch {
			case !encID.given():
				return usagef("--id is required")
			case byHand == (encAddresses != "" || encNetwork != ""):
				return usagef("give --addresses and --network, or --by-hand")
			}
			return cf.with(func(ctx context.Context, conn *grpc.ClientConn, _ *keyserver.Credentials) error {
				id, err := layoutID(ctx, api.NewAdminClient(conn), &encID)
				if err != nil {
					return err
				}
				r, err := api.NewAdminClient(conn).SetEnclaveAddresses(ctx, &api.SetEnclaveAddressesRequest{Enclave: uint32(id), Addresses: encAddresses, Network: encNetwork})
				if err != nil {
					return rpcError(err)
				}
				fmt.Fprintln(streams.Out, r.GetMessage())
				return nil
			})
		},
	}
	enclaveAddresses.Flags().Var(&encID, "id", "enclave id")
	enclaveAddresses.Flags().Bool("by-hand", false, "take the block away: addresses are given with --ip again")
	addressFlags(enclaveAddresses)
	var keyMode string
	enclaveKeyMode := &cobra.Command{
		Use:   "key-mode --id I --mode enclave|org",
		Short: "Record that an enclave's key server holds an enclave key of its own (enclave-key mode), or not",
		Long: `Record in the registry that enclave I's key server holds an enclave key of
its own (--mode enclave: it was started with --peer or --enclave-key-file)
or takes its pair keys from the org key again (--mode org). The map, the
sight assertions and enclave audit readers count its pairs' readers by it:
in enclave-key mode, org key holders, monitors and gateway grants served
from the org key read none of its pairs. It does not change the key
server itself: its own start does.`,
		Example: `  enclave admin enclave key-mode --id 4 --mode enclave --dry-run`,
		Args:    noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if !encID.given() || (keyMode != "enclave" && keyMode != "org") {
				return usagef("--id and --mode (enclave or org) are required")
			}
			return submit(func(l keys.Layout) (*api.PreviewRequest, error) {
				id, err := encID.in(l)
				return &api.PreviewRequest{Change: &api.PreviewRequest_SetEnclaveKeyMode{SetEnclaveKeyMode: &api.SetEnclaveKeyModeRequest{Enclave: uint32(id), EnclaveKey: keyMode == "enclave"}}}, err
			})
		},
	}
	enclaveKeyMode.Flags().Var(&encID, "id", "enclave id (a level-1 enclave)")
	enclaveKeyMode.Flags().StringVar(&keyMode, "mode", "", "enclave (its key server's own enclave key) or org (keys from the org key)")
	enclave.AddCommand(enclaveAdd, enclaveAddresses, enclaveKeyMode)

	var devName, devRole, devFingerprint, devOverlay string
	var devEnclave enclaveFlag
	var devServerID serverIDFlag
	device := &cobra.Command{Use: "device", Short: "Manage devices"}
	deviceAdd := &cobra.Command{
		Use: "add --name N --role R [--enclave I] [--server-id K] [--ip ADDR/PREFIX]", Short: "Register a device", Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if devName == "" || devRole == "" {
				return usagef("--name and --role are required")
			}
			if _, err := ca.ParseRole(devRole); err != nil {
				return usageError(err)
			}
			req := &api.AddDeviceRequest{Name: devName, Role: devRole, Fingerprint: devFingerprint, Overlay: devOverlay}
			if devServerID.set {
				k := uint32(devServerID.id)
				req.ServerId = &k
			}
			return submit(func(l keys.Layout) (*api.PreviewRequest, error) {
				id, err := devEnclave.in(l)
				req.Enclave = uint32(id)
				return &api.PreviewRequest{Change: &api.PreviewRequest_AddDevice{AddDevice: req}}, err
			})
		},
	}
	deviceAdd.Flags().StringVar(&devName, "name", "", "device name (as in its certificate)")
	deviceAdd.Flags().StringVar(&devRole, "role", "", "server, client, gateway, keyserver, monitor or admin")
	deviceAdd.Flags().Var(&devEnclave, "enclave", "the device's enclave or sub-enclave id (3, or 3.2)")
	deviceAdd.Flags().Var(&devServerID, "server-id", "the server id (servers)")
	deviceAdd.Flags().StringVar(&devFingerprint, "fingerprint", "", "pin one certificate (sha256:..., from enclave cert show)")
	deviceAdd.Flags().StringVar(&devOverlay, "ip", "", "the overlay address its certificate carries, e.g. 100.64.3.3/16 (default: the next free one of its enclave's block, if it has one)")
	var revokeName string
	deviceRevoke := &cobra.Command{
		Use: "revoke --name N", Short: "Revoke a device at once", Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if revokeName == "" {
				return usagef("--name is required")
			}
			return submit(fixed(&api.PreviewRequest{Change: &api.PreviewRequest_RevokeDevice{RevokeDevice: &api.RevokeDeviceRequest{Name: revokeName}}}))
		},
	}
	deviceRevoke.Flags().StringVar(&revokeName, "name", "", "device name")
	var removeName string
	deviceRemove := &cobra.Command{
		Use: "remove --name N", Short: "Take a revoked device out of the lists (it stays revoked; its name is not reused)", Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if removeName == "" {
				return usagef("--name is required")
			}
			return submit(fixed(&api.PreviewRequest{Change: &api.PreviewRequest_RemoveDevice{RemoveDevice: &api.RemoveDeviceRequest{Name: removeName}}}))
		},
	}
	deviceRemove.Flags().StringVar(&removeName, "name", "", "device name")
	var listAll, listJSON bool
	deviceList := &cobra.Command{
		Use: "list [--all] [--json]", Short: "List the registered devices: role, enclave, server id, address, state, last seen, certificate expiry, endpoints, pinned certificate", Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return cf.with(func(ctx context.Context, conn *grpc.ClientConn, _ *keyserver.Credentials) error {
				st, err := api.NewAdminClient(conn).Status(ctx, &api.StatusRequest{})
				if err != nil {
					return rpcError(err)
				}
				var ds []*api.Device
				for _, d := range st.GetDevices() {
					if listAll || !d.GetRemoved() {
						ds = append(ds, d)
					}
				}
				if listJSON {
					b, err := protoJSON(&api.StatusReply{Devices: ds})
					if err != nil {
						return failed(err)
					}
					fmt.Fprintln(streams.Out, string(b))
					return nil
				}
				printDevices(streams.Out, statusLayout(st), ds)
				return nil
			})
		},
	}
	deviceList.Flags().BoolVar(&listAll, "all", false, "also list removed devices")
	deviceList.Flags().BoolVar(&listJSON, "json", false, "print JSON")
	device.AddCommand(deviceAdd, deviceRevoke, deviceRemove, deviceList)

	pair := &cobra.Command{Use: "pair", Short: "Manage which enclave pairs may talk"}
	pairAllow := pairCommand("allow", "Let enclaves I and J talk (I-I: within one enclave); I J is also accepted", submit,
		func(p registry.Pair) *api.PreviewRequest {
			return &api.PreviewRequest{Change: &api.PreviewRequest_AllowPair{AllowPair: &api.AllowPairRequest{A: uint32(p.A), B: uint32(p.B)}}}
		})
	pairForbid := pairCommand("forbid", "Stop enclaves I and J from talking: servers end the pair's SAs, gateways stop reading it; I J is also accepted", submit,
		func(p registry.Pair) *api.PreviewRequest {
			return &api.PreviewRequest{Change: &api.PreviewRequest_ForbidPair{ForbidPair: &api.ForbidPairRequest{A: uint32(p.A), B: uint32(p.B)}}}
		})
	pair.AddCommand(pairAllow, pairForbid)

	var grantDevice, grantPairs string
	var grantAll bool
	grant := &cobra.Command{Use: "grant", Short: "Manage what gateways and monitors may see"}
	grantAdd := &cobra.Command{
		Use: "add --device N (--pairs I-J[,I-J] | --all)", Short: "Grant a gateway pairs, or a monitor everything", Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if grantDevice == "" || (grantPairs == "") == !grantAll {
				return usagef("--device and exactly one of --pairs and --all are required")
			}
			return submit(func(l keys.Layout) (*api.PreviewRequest, error) {
				pairs, err := parsePairs(l, grantPairs)
				return &api.PreviewRequest{Change: &api.PreviewRequest_AddGrant{AddGrant: &api.AddGrantRequest{Device: grantDevice, Pairs: pairs, All: grantAll}}}, err
			})
		},
	}
	grantAdd.Flags().StringVar(&grantDevice, "device", "", "gateway or monitor name")
	grantAdd.Flags().StringVar(&grantPairs, "pairs", "", "pairs I-J, comma-separated, at any level (3-7, or 3.1-7.2: that sub-pair's key only)")
	grantAdd.Flags().BoolVar(&grantAll, "all", false, "everything (monitors only)")
	var revDevice, revPairs string
	grantRevoke := &cobra.Command{
		Use: "revoke --device N [--pairs I-J,...]", Short: "Withdraw a grant (all of it without --pairs)", Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if revDevice == "" {
				return usagef("--device is required")
			}
			return submit(func(l keys.Layout) (*api.PreviewRequest, error) {
				pairs, err := parsePairs(l, revPairs)
				return &api.PreviewRequest{Change: &api.PreviewRequest_RevokeGrant{RevokeGrant: &api.RevokeGrantRequest{Device: revDevice, Pairs: pairs}}}, err
			})
		},
	}
	grantRevoke.Flags().StringVar(&revDevice, "device", "", "gateway or monitor name")
	grantRevoke.Flags().StringVar(&revPairs, "pairs", "", "pairs I-J, comma-separated")
	grant.AddCommand(grantAdd, grantRevoke)

	var rotEnclave enclaveFlag
	var rotPair string
	var rotNow bool
	rotate := &cobra.Command{
		Use: "rotate (--enclave I | --pair I-J) [--now]", Short: "Rotate an enclave's pairs or one pair now (or when grace allows; --now: at once)", Args: noArgs,
		Long: `Rotate an enclave's pairs, or one pair: the pair moves to its next
generation, and the previous one stays accepted for the grace period while
servers ask their clients to re-establish. A pair rotated less than the
grace ago rotates when the grace ends (the output says when), so that no
generation retires before its SAs moved on.

--now rotates at once even then: the generation before the previous one
stops being accepted immediately, and SAs still on it end (their clients
re-establish on the new generation). Use it when a key may be lost.

Examples:
  enclave admin ... rotate --pair 3-7
  enclave admin ... rotate --pair 3-7 --now`,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if rotEnclave.given() == (rotPair != "") {
				return usagef("give exactly one of --enclave and --pair")
			}
			return submit(func(l keys.Layout) (*api.PreviewRequest, error) {
				req := &api.RotateRequest{Now: rotNow}
				if rotEnclave.given() {
					id, err := rotEnclave.in(l)
					req.Enclave = uint32(id)
					return &api.PreviewRequest{Change: &api.PreviewRequest_Rotate{Rotate: req}}, err
				}
				ps, err := parsePairs(l, rotPair)
				if err != nil || len(ps) != 1 {
					return nil, fmt.Errorf("--pair: want one pair I-J (%v)", err)
				}
				req.Pair = ps[0]
				return &api.PreviewRequest{Change: &api.PreviewRequest_Rotate{Rotate: req}}, nil
			})
		},
	}
	rotate.Flags().Var(&rotEnclave, "enclave", "rotate every allowed pair of this enclave")
	rotate.Flags().StringVar(&rotPair, "pair", "", "rotate this pair I-J")
	rotate.Flags().BoolVar(&rotNow, "now", false, "rotate at once even within grace of the last rotation (the generation before the previous one retires at once)")

	var statusJSON bool
	statusCmd := &cobra.Command{
		Use: "status", Short: "Show enclaves, devices, pairs with generations, and grants", Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return cf.with(func(ctx context.Context, conn *grpc.ClientConn, _ *keyserver.Credentials) error {
				st, err := api.NewAdminClient(conn).Status(ctx, &api.StatusRequest{})
				if err != nil {
					return rpcError(err)
				}
				if statusJSON {
					b, err := protoJSON(st)
					if err != nil {
						return failed(err)
					}
					fmt.Fprintln(streams.Out, string(b))
					return nil
				}
				printStatus(streams, st)
				return nil
			})
		},
	}
	statusCmd.Flags().BoolVar(&statusJSON, "json", false, "print JSON")
	withDryRun(enclaveAdd, enclaveKeyMode, deviceAdd, deviceRevoke, deviceRemove, pairAllow, pairForbid, grantAdd, grantRevoke, rotate)
	cmd.AddCommand(enclave, device, pair, grant, rotate, statusCmd, newTokenCmd(streams, &cf), newAssertCmd(streams, &cf, submit, withDryRun), newExportCmd(streams, &cf), newApplyCmd(streams, &cf))
	return cmd
}

// fixed is a change that names no enclave ids, for submit.
func fixed(req *api.PreviewRequest) func(keys.Layout) (*api.PreviewRequest, error) {
	return func(keys.Layout) (*api.PreviewRequest, error) { return req, nil }
}

// adminLayout asks the key service for the org's layout (the default from
// one too old to say).
func adminLayout(ctx context.Context, a api.AdminClient) (keys.Layout, error) {
	r, err := a.Layout(ctx, &api.LayoutRequest{})
	if status.Code(err) == codes.Unimplemented {
		return keys.Layout{}, nil
	}
	if err != nil {
		return keys.Layout{}, rpcError(err)
	}
	if r.GetLayout() == "" {
		return keys.Layout{}, nil
	}
	l, err := keys.ParseLayout(r.GetLayout())
	if err != nil {
		return keys.Layout{}, failed(fmt.Errorf("the key service's enclave layout: %w", err))
	}
	return l, nil
}

// layoutID reads f under the org's layout.
func layoutID(ctx context.Context, a api.AdminClient, f *enclaveFlag) (keys.EnclaveID, error) {
	l, err := adminLayout(ctx, a)
	if err != nil {
		return 0, err
	}
	id, err := f.in(l)
	if err != nil {
		return 0, usageError(err)
	}
	return id, nil
}

func parsePairs(l keys.Layout, text string) ([]*api.Pair, error) {
	if text == "" {
		return nil, nil
	}
	var out []*api.Pair
	for _, s := range strings.Split(text, ",") {
		p, err := registry.ParsePairIn(l, s)
		if err != nil {
			return nil, err
		}
		out = append(out, &api.Pair{A: uint32(p.A), B: uint32(p.B)})
	}
	return out, nil
}

// printRotations says what each rotation does, plainly: when the pair's
// next generation takes effect, and why not at once if it does not.
func printRotations(streams IO, l keys.Layout, rs []*api.RotationOutcome) {
	for _, r := range rs {
		pair := apiPairName(l, r.GetPair())
		at := r.GetAt().AsTime().UTC().Format(time.RFC3339)
		switch r.GetOutcome() {
		case "rotated":
			fmt.Fprintf(streams.Out, "  pair %s rotated: generation %d from now (%s)\n", pair, r.GetGeneration(), r.GetReason())
		case "delayed":
			fmt.Fprintf(streams.Out, "  pair %s rotates to generation %d at %s: it last rotated less than the grace period ago (%s)\n", pair, r.GetGeneration()+1, at, r.GetReason())
		case "hurried":
			fmt.Fprintf(streams.Out, "  pair %s rotated now: generation %d from now; generation %d stays accepted for the grace period, generation %d is no longer accepted (SAs on it end and are re-established) (%s)\n", pair, r.GetGeneration(), r.GetGeneration()-1, r.GetGeneration()-2, r.GetReason())
		case "coalesced":
			fmt.Fprintf(streams.Out, "  pair %s already rotates to generation %d at %s; this joins it (%s)\n", pair, r.GetGeneration()+1, at, r.GetReason())
		default:
			fmt.Fprintf(streams.Out, "  pair %s: %s, generation %d at %s (%s)\n", pair, r.GetOutcome(), r.GetGeneration(), at, r.GetReason())
		}
	}
}

// printDevices prints the device list as a table.
func printDevices(w io.Writer, l keys.Layout, ds []*api.Device) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tROLE\tENCLAVE\tSERVER ID\tADDRESS\tSTATE\tLAST SEEN\tCERT EXPIRES\tENDPOINTS\tCERTIFICATE")
	now := time.Now()
	for _, d := range ds {
		enclave, sid := "-", "-"
		if d.GetEnclave() != 0 {
			enclave = l.Short(keys.EnclaveID(d.GetEnclave()))
		}
		if d.ServerId != nil {
			sid = fmt.Sprint(d.GetServerId())
		}
		state := "active"
		switch {
		case d.GetAwaiting():
			state = "awaiting its host's join (enclave admin apply gave its token; once it expired, enclave admin token create makes another)"
		case d.GetPending():
			state = "pending (its host has not confirmed: run its join again; once the token expired, make a new one)"
		}
		if d.GetRevoked() {
			state = "revoked"
			if d.GetRevokedAt() != nil {
				state += " " + d.GetRevokedAt().AsTime().UTC().Format(time.RFC3339)
			}
		}
		if d.GetRemoved() {
			state += " (removed)"
		}
		cert := "any valid certificate"
		if d.GetFingerprint() != "" {
			cert = "pinned " + d.GetFingerprint()
		}
		addr := d.GetOverlay()
		if addr == "" {
			addr = "-"
		}
		seen, expires, eps := "-", "-", "-"
		if d.GetLastSeen() != nil {
			seen = short(now.Sub(d.GetLastSeen().AsTime())) + " ago"
		}
		if d.GetCertExpires() != nil {
			expires = d.GetCertExpires().AsTime().UTC().Format(time.DateOnly)
			if d.GetCertExpires().AsTime().Before(now) {
				expires += " (EXPIRED)"
			}
		}
		if len(d.GetEndpoints()) > 0 {
			eps = strings.Join(d.GetEndpoints(), ",")
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", d.GetName(), d.GetRole(), enclave, sid, addr, state, seen, expires, eps, cert)
	}
	tw.Flush()
}

// layoutOr reads a layout a key service sent (the default when it sent
// none, or one this tool cannot read).
func layoutOr(s string) keys.Layout {
	l, err := keys.ParseLayout(s)
	if s == "" || err != nil {
		return keys.Layout{}
	}
	return l
}

// statusLayout is the layout a status reply names (the default when it
// names none, or one this tool cannot read).
func statusLayout(st *api.StatusReply) keys.Layout { return layoutOr(st.GetLayout()) }

// apiPairName writes p dotted under l (3.1-7.2).
func apiPairName(l keys.Layout, p *api.Pair) string {
	return registry.PairName(l, registry.NewPair(keys.EnclaveID(p.GetA()), keys.EnclaveID(p.GetB())))
}

func printStatus(streams IO, st *api.StatusReply) {
	w := streams.Out
	l := statusLayout(st)
	if !l.IsDefault() {
		fmt.Fprintf(w, "enclave layout: %s (sub-enclaves nested under their enclave)\n", l)
	}
	fmt.Fprintln(w, "enclaves:")
	for _, e := range st.GetEnclaves() { // sorted by id: a sub-enclave follows its enclave
		addrs := ""
		if e.GetAddresses() != "" {
			addrs = fmt.Sprintf(" (addresses %s in %s)", e.GetAddresses(), e.GetNetwork())
		}
		indent := strings.Repeat("  ", max(l.Level(keys.EnclaveID(e.GetId())), 1))
		fmt.Fprintf(w, "%s%s %s%s\n", indent, l.Short(keys.EnclaveID(e.GetId())), e.GetName(), addrs)
	}
	fmt.Fprintln(w, "devices:")
	for _, d := range st.GetDevices() {
		extra := ""
		if d.GetEnclave() != 0 {
			extra += " enclave " + l.Short(keys.EnclaveID(d.GetEnclave()))
		}
		if d.ServerId != nil {
			extra += fmt.Sprintf(" server-id %d", d.GetServerId())
		}
		if d.GetOverlay() != "" {
			extra += " " + d.GetOverlay()
		}
		if d.GetPending() {
			extra += " PENDING (join not confirmed)"
		}
		if d.GetRevoked() {
			extra += " REVOKED"
		}
		if d.GetRemoved() {
			extra += " (removed)"
		}
		fmt.Fprintf(w, "  %s (%s)%s\n", d.GetName(), d.GetRole(), extra)
	}
	fmt.Fprintln(w, "pairs:")
	for _, p := range st.GetPairs() {
		pending := ""
		if p.GetPendingAt() != nil {
			pending = ", rotation pending at " + p.GetPendingAt().AsTime().Format(time.RFC3339)
		}
		fmt.Fprintf(w, "  %s generation %d since %s%s\n", apiPairName(l, p.GetPair()), p.GetGeneration(), p.GetRotatedAt().AsTime().Format(time.RFC3339), pending)
	}
	for _, p := range st.GetForbidden() {
		fmt.Fprintf(w, "  %s forbidden (beneath an allowed pair: the most specific rule wins)\n", apiPairName(l, p))
	}
	fmt.Fprintln(w, "grants:")
	for _, g := range st.GetGrants() {
		if g.GetAll() {
			fmt.Fprintf(w, "  %s: everything\n", g.GetDevice())
			continue
		}
		var ps []string
		for _, p := range g.GetPairs() {
			ps = append(ps, apiPairName(l, p))
		}
		fmt.Fprintf(w, "  %s: %s\n", g.GetDevice(), strings.Join(ps, ", "))
	}
}

// fetchedKey is one line of keys fetch.
type fetchedKey struct {
	Level      string  `json:"level"`
	Enclave    uint32  `json:"enclave"`
	Peer       uint32  `json:"peer"`
	Server     *uint32 `json:"server,omitempty"`
	Generation uint32  `json:"generation"`
	Current    bool    `json:"current"`
	ValidFrom  string  `json:"valid_from,omitempty"`
	ValidUntil string  `json:"valid_until"`
	Key        string  `json:"key,omitempty"`
	// PairLevel and Name, under a sub-enclave layout: the pair key's
	// level and the key as written there (EK_2(3.2,7.1,1)).
	PairLevel uint32 `json:"pair_level,omitempty"`
	Name      string `json:"name,omitempty"`
}

func newKeysFetchCmd(streams IO) *cobra.Command {
	var cf connFlags
	var asJSON, showSecrets bool
	var pairsText string
	var layout layoutFlag
	cmd := &cobra.Command{
		Use:   "fetch --keyserver ADDR --ca CA.crt --cert C --key K [--pairs I-J,...] [--layout W1.W2] [--json] [--show-secrets]",
		Short: "Fetch the keys this device's role entitles it to",
		Long: `Ask the key service for what this device is entitled to: a server its server
keys, a gateway or monitor its granted pair keys, an enclave key server its
enclave's pair keys (--pairs asks for some of them only; asking beyond the
grants is refused). Prints levels, ids, generations and validity; key bytes
only with --show-secrets (lowercase hex). A client has nothing to fetch and
is refused (exit 1).`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			var out []fetchedKey
			err := cf.with(func(ctx context.Context, conn *grpc.ClientConn, creds *keyserver.Credentials) error {
				var err error
				out, err = fetchKeys(ctx, conn, creds, layout.l, pairsText, showSecrets)
				return err
			})
			if err != nil {
				return err
			}
			if asJSON {
				if out == nil {
					out = []fetchedKey{}
				}
				return json.NewEncoder(streams.Out).Encode(out)
			}
			for _, k := range out {
				ids := fmt.Sprintf("EK(%d,%d,%d)", k.Enclave, k.Peer, k.Generation)
				if k.Server != nil {
					ids = fmt.Sprintf("SK(%d,%d,%d,%d)", k.Enclave, k.Peer, *k.Server, k.Generation)
				}
				if k.Name != "" {
					ids = k.Name
				}
				state := "previous"
				if k.Current {
					state = "current"
				}
				line := fmt.Sprintf("%-6s %-22s generation %d %-8s valid until %s", k.Level, ids, k.Generation, state, k.ValidUntil)
				if k.Key != "" {
					line += " key " + k.Key
				}
				fmt.Fprintln(streams.Out, line)
			}
			return nil
		},
	}
	cf.register(cmd)
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	cmd.Flags().BoolVar(&showSecrets, "show-secrets", false, "print the key bytes too")
	cmd.Flags().StringVar(&pairsText, "pairs", "", "only these pairs, I-J comma-separated (pair-key holders); dotted (3.2-7.1) with --layout")
	cmd.Flags().Var(&layout, "layout", "the org's enclave layout (8.8), for dotted --pairs")
	return cmd
}

// fetchKeys asks for what the certificate's role entitles it to.
func fetchKeys(ctx context.Context, conn *grpc.ClientConn, creds *keyserver.Credentials, l keys.Layout, pairsText string, showSecrets bool) ([]fetchedKey, error) {
	id, err := ca.IdentityOf(creds.Cert.Leaf)
	if err != nil {
		return nil, failed(err)
	}
	ks := api.NewKeyServiceClient(conn)
	var out []fetchedKey
	switch id.Role {
	case ca.RoleGateway, ca.RoleMonitor, ca.RoleKeyserver:
		pairs, err := parsePairs(l, pairsText) // a device cannot ask for the layout: --layout says it
		if err != nil {
			return nil, usageError(err)
		}
		pk, err := ks.GetPairKeys(ctx, &api.GetPairKeysRequest{Pairs: pairs})
		if err != nil {
			return nil, rpcError(err)
		}
		l := layoutOr(pk.GetLayout())
		for _, k := range pk.GetKeys() {
			f := fetched("pair", k.GetPair().GetA(), k.GetPair().GetB(), nil, k.GetValidity(), k.GetKey(), showSecrets)
			if !l.IsDefault() {
				f.PairLevel = max(k.GetLevel(), 1)
				f.Name = fmt.Sprintf("EK_%d(%s,%s,%d)", f.PairLevel, l.Short(keys.EnclaveID(f.Enclave)), l.Short(keys.EnclaveID(f.Peer)), f.Generation)
			}
			out = append(out, f)
		}
	default: // servers; anyone else is refused by the service, and audited
		if pairsText != "" {
			return nil, usagef("--pairs is for gateways, monitors and enclave key servers")
		}
		sk, err := ks.GetServerKeys(ctx, &api.GetServerKeysRequest{})
		if err != nil {
			return nil, rpcError(err)
		}
		l := layoutOr(sk.GetLayout())
		for _, k := range sk.GetKeys() {
			srv := k.GetServer()
			f := fetched("server", k.GetEnclave(), k.GetPeer(), &srv, k.GetValidity(), k.GetKey(), showSecrets)
			if !l.IsDefault() {
				f.Name = fmt.Sprintf("SK(%s,%s,%d,%d)", l.Short(keys.EnclaveID(f.Enclave)), l.Short(keys.EnclaveID(f.Peer)), srv, f.Generation)
			}
			out = append(out, f)
		}
	}
	return out, nil
}

func fetched(level string, a, b uint32, server *uint32, v *api.Validity, key []byte, show bool) fetchedKey {
	f := fetchedKey{Level: level, Enclave: a, Peer: b, Server: server, Generation: v.GetGeneration(), Current: v.GetCurrent(),
		ValidUntil: v.GetValidUntil().AsTime().UTC().Format(time.RFC3339)}
	if v.GetValidFrom() != nil {
		f.ValidFrom = v.GetValidFrom().AsTime().UTC().Format(time.RFC3339)
	}
	if show {
		f.Key = hex.EncodeToString(key)
	}
	clear(key)
	return f
}

// pairCommand is `pair VERB I-J` (or `I J`): it parses the pair and
// submits the change req makes of it.
func pairCommand(verb, short string, submit func(func(keys.Layout) (*api.PreviewRequest, error)) error, req func(registry.Pair) *api.PreviewRequest) *cobra.Command {
	return &cobra.Command{
		Use: verb + " I-J [--dry-run]", Short: short,
		RunE: func(cmd *cobra.Command, args []string) error {
			var text string
			switch len(args) {
			case 1:
				text = args[0]
			case 2:
				text = args[0] + "-" + args[1]
			default:
				return usagef("give one pair: pair %s I-J", verb)
			}
			return submit(func(l keys.Layout) (*api.PreviewRequest, error) {
				p, err := registry.ParsePairIn(l, text)
				if err != nil {
					return nil, err
				}
				return req(p), nil
			})
		},
	}
}
