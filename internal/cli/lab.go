package cli

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/enclavekeys/enclave/internal/lab"
	"github.com/enclavekeys/enclave/internal/visibility"
)

func newLabCmd(streams IO) *cobra.Command {
	var jsonPath, mapPath, keep string
	var seed int64
	var verbose, netns, faults bool
	cmd := &cobra.Command{
		Use:   "lab [--json FILE] [--map FILE] [--keep DIR] [--seed N]",
		Short: "Run the whole system in one process and report what happened (no root)",
		Long: `Run the whole of Enclave in this process, as DESIGN's Fig 1A: four enclaves
(web, app, db, ops); an org key server and two enclave key servers (app's
takes its pair keys from the org tier, ops's holds its own enclave key);
relay gateways on the enclave boundaries with grants, a gateway that cannot
derive keys, one granted late, and an org-wide monitor; servers and
clients as netstack agents. Everything talks through the real code paths:
gRPC over mutual TLS and UDP on loopback.

It runs a scenario step by step (a line each as it goes): enrolment;
enclave discovery through a gateway for a client whose certificate names no
enclave; SAs and traffic between the allowed pairs; a refused pair; a
gateway reading only its pairs; a rotation under traffic with no loss; a
revocation; direct key exchange; a late-joining gateway; a tampered packet
and a handshake flood; the visibility map. Then a report: each step passed
or failed with its figures. Exit status 0 only if every step passed.

--map FILE writes the visibility map (one self-contained HTML page; open
it in a browser; enclave-lab-map.html by default, --map "" for none),
--json FILE the report as JSON, --keep DIR keeps the CA, certificates,
store, audit log, the gateways' flow logs and the components' logs
(lab.log) there, --seed N picks the scenario's payloads. --verbose sends
the components' logs to stderr.

--faults runs the failure model instead, in process: under continuous
traffic (50 datagrams a second and a TCP connection) the key service goes
down, the gateway's policy is reloaded, a pair is allowed and forbidden,
the relay gateway, the server and the client restart; the report gives
each fault's datagrams lost, longest gap, the time to traffic after the
restarted part is up and whether the goal was met (server 3 s, client and
relay 1 s, registry changes 2 s, nothing lost otherwise). With --netns it
also kills a server agent process (SIGKILL) and restarts an inline gateway
in the namespaces.

--netns (root; needs ip, iptables, ping, iperf3 and curl) runs the
organisation as real processes of this binary instead: a router namespace
with the key server and two inline gateways on netfilter queues, and a
namespace per host with an agent on a TUN device; pings across the allowed
pairs, a refused pair, what each gateway read, an iperf3 run through a
gateway and a rotation under ping. Everything it made is removed when it
ends, also when interrupted; --keep DIR keeps the files and each process's
log.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			cfg := lab.Config{Dir: keep, Seed: seed, Progress: streams.Err, Terminal: isTerminal(streams.Err)}
			switch {
			case verbose:
				cfg.Log = slog.New(slog.NewJSONHandler(streams.Err, nil))
			case keep != "":
				if err := os.MkdirAll(keep, 0o700); err != nil {
					return fileError(fmt.Errorf("--keep: %w", err))
				}
				f, err := os.Create(filepath.Join(keep, "lab.log"))
				if err != nil {
					return fileError(fmt.Errorf("--keep: %w", err))
				}
				defer f.Close()
				cfg.Log = slog.New(slog.NewJSONHandler(f, nil))
			}
			run := lab.Run
			if (netns || faults) && cmd.Flags().Changed("map") && mapPath != "" {
				return usagef("--map is drawn by the in-process lab; drop --netns, --faults or --map")
			}
			switch {
			case netns:
				run = lab.RunNetns
				cfg.Faults = faults
			case faults:
				run = lab.RunFaults
			}
			rep, err := run(ctx, cfg)
			if errors.Is(err, lab.ErrNetns) {
				return usageError(err)
			}
			if err != nil {
				return failed(err)
			}
			rep.Print(streams.Out)
			if jsonPath != "" {
				f, err := os.Create(jsonPath)
				if err != nil {
					return fileError(fmt.Errorf("--json: %w", err))
				}
				err = rep.JSON(f)
				f.Close()
				if err != nil {
					return failed(err)
				}
				fmt.Fprintf(streams.Out, "report written to %s\n", jsonPath)
			}
			if m, ok := rep.Map.(*visibility.Map); ok && mapPath != "" {
				if err := writeMap(IO{Out: streams.Out, Err: streams.Out}, m, "html", mapPath); err != nil {
					return err
				}
				fmt.Fprintf(streams.Out, "open %s in a browser: who can read what\n", mapPath)
			}
			if !rep.Passed {
				return failed(fmt.Errorf("the lab found failures (above)"))
			}
			return nil
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&jsonPath, "json", "", "write the report as JSON to this file")
	fl.StringVar(&mapPath, "map", "enclave-lab-map.html", "write the visibility map (HTML) to this file (empty: none)")
	fl.StringVar(&keep, "keep", "", "keep the CA, configs, store and logs in this directory")
	fl.Int64Var(&seed, "seed", 1, "seed of the scenario's payloads")
	fl.BoolVar(&verbose, "verbose", false, "the components' structured logs to stderr")
	fl.BoolVar(&faults, "faults", false, "run the failure model under traffic and report what each fault cost")
	fl.BoolVar(&netns, "netns", false, "root: the same organisation as real processes, TUN agents and inline gateways in network namespaces")
	return cmd
}

// isTerminal reports whether w is a terminal (a progress line is then
// rewritten in place).
func isTerminal(w any) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeCharDevice != 0
}
