package cli

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"os"
	"os/signal"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/enclavekeys/enclave/internal/lab"
)

func newBenchCmd(streams IO) *cobra.Command {
	cmd := &cobra.Command{Use: "bench", Short: "Measure the running system"}
	var cfg lab.SASConfig
	var asJSON bool
	sas := &cobra.Command{
		Use:   "sas --count N [--clients M] [--duration D] [--sample S] [--spread D] [--json]",
		Short: "One server agent with N SAs: handshakes per second, memory per SA, a rotation at scale",
		Long: `Bring up N SAs on one server agent (a process of this binary, so that its
memory and CPU are its own) from an in-process load generator that runs the
client side of real handshakes: a certificate per client, Noise IX, the
server's flood guard and cookies, the grant, over UDP on loopback, with a
real key service over mTLS. Then rotate the pair under ping traffic on a
sample of the SAs and wait until every SA is re-established.

It reports handshakes per second (over the whole build-up, its first and
last tenth) and their p50/p99 latency; the server's memory per SA (RSS and
heap growth divided by N); the hierarchy keys it holds; the key-service
requests the rotation cost it; how long re-establishing every SA took
within the grace; the sample's pings lost; CPU seconds per 1,000
handshakes. --json prints the same as JSON.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if cfg.Count <= 0 || cfg.Count > 1_000_000 {
				return usagef("--count %d: want 1 to 1000000", cfg.Count)
			}
			cfg.Progress, cfg.Terminal = streams.Err, isTerminal(streams.Err)
			return runBench(cmd.Context(), streams, asJSON, false, func(ctx context.Context) (*lab.SASReport, error) { return lab.RunSAS(ctx, cfg) },
				printSAS, func(*lab.SASReport) []lab.Goal { return nil })
		},
	}
	fl := sas.Flags()
	fl.IntVar(&cfg.Count, "count", 2000, "SAs to bring up")
	fl.IntVar(&cfg.Clients, "clients", 64, "handshakes in flight at once")
	fl.IntVar(&cfg.Sample, "sample", 100, "SAs that carry pings across the rotation")
	fl.DurationVar(&cfg.Spread, "spread", 0, "the server's rekey spread after the rotation (default and at most half the grace, which is 30 s or 3 ms per SA)")
	fl.DurationVar(&cfg.Duration, "duration", time.Second, "how long the sample carries traffic before the rotation")
	fl.BoolVar(&asJSON, "json", false, "print the report as JSON")
	cmd.AddCommand(sas, newBenchRegistryCmd(streams), newBenchWatchersCmd(streams))
	return cmd
}

func newBenchRegistryCmd(streams IO) *cobra.Command {
	var cfg lab.RegistryConfig
	var asJSON, check bool
	c := &cobra.Command{
		Use:   "registry [--devices N] [--workers W] [--sample S] [--json] [--check]",
		Short: "A key server with N devices: the cost of one more, a restart, the map and a dry run",
		Long: `Start a key server (a process of this binary, on a bbolt store and an audit
log in a temporary directory) and register N devices through its admin API
over mTLS: servers and clients (the clients handed addresses from an
enclave's block), W requests in flight. The cost of registering one device
is measured over S adds made one after another near the start (after 100)
and again at N: latency as the admin sees it, and the key server's CPU
time per add. Then the status and the visibility map, a dry run of one
more add, and a restart of the key server (SIGTERM, start, until /readyz
answers) on the store of N devices.

It prints each figure and the goals of the fleet-scale work (issue 36)
met or not; --check exits 1 when one is not met. --json prints the same
as JSON.`,
		Example: `  enclave bench registry --devices 5000
  enclave bench registry --devices 100000 --json > registry.json`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if cfg.Devices < 1000 || cfg.Devices > 10_000_000 {
				return usagef("--devices %d: want 1000 to 10000000", cfg.Devices)
			}
			if cfg.Workers < 1 || cfg.Workers > 256 {
				return usagef("--workers %d: want 1 to 256", cfg.Workers)
			}
			if cfg.Sample < 10 || 2*cfg.Sample+100 > cfg.Devices {
				return usagef("--sample %d: want 10 to %d for %d devices", cfg.Sample, (cfg.Devices-100)/2, cfg.Devices)
			}
			cfg.Progress, cfg.Terminal = streams.Err, isTerminal(streams.Err)
			return runBench(cmd.Context(), streams, asJSON, check, func(ctx context.Context) (*lab.RegistryReport, error) { return lab.RunRegistry(ctx, cfg) },
				printRegistry, func(r *lab.RegistryReport) []lab.Goal { return r.Goals })
		},
	}
	fl := c.Flags()
	fl.IntVar(&cfg.Devices, "devices", 100_000, "devices to register")
	fl.IntVar(&cfg.Workers, "workers", 8, "admin requests in flight while registering")
	fl.IntVar(&cfg.Sample, "sample", 200, "adds measured one by one near the start and at N")
	fl.BoolVar(&asJSON, "json", false, "print the report as JSON")
	fl.BoolVar(&check, "check", false, "exit 1 if a goal is not met")
	return c
}

// runBench runs a bench until it ends or the process is interrupted, and
// prints its report (as JSON, or as print writes it); with check, goals
// not met make it fail.
func runBench[R any](ctx context.Context, streams IO, asJSON, check bool, run func(context.Context) (*R, error), print func(io.Writer, *R), goals func(*R) []lab.Goal) error {
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stop()
	rep, err := run(ctx)
	if err != nil {
		return failed(err)
	}
	if asJSON {
		enc := json.NewEncoder(streams.Out)
		enc.SetIndent("", "  ")
		enc.SetEscapeHTML(false) // goals read "<= 51200", not "\u003c= 51200"
		if err := enc.Encode(rep); err != nil {
			return err
		}
	} else {
		print(streams.Out, rep)
	}
	return goalsMet(goals(rep), check)
}

// goalsMet fails with the goals not met, when asked to.
func goalsMet(goals []lab.Goal, check bool) error {
	if !check {
		return nil
	}
	var missed []string
	for _, g := range goals {
		if !g.Met {
			got, want := goalText(g)
			missed = append(missed, fmt.Sprintf("%s: %s, want %s", g.Name, got, want))
		}
	}
	if len(missed) > 0 {
		return failed(fmt.Errorf("goals not met: %s", strings.Join(missed, "; ")))
	}
	return nil
}

func printGoals(w io.Writer, goals []lab.Goal) {
	fmt.Fprintln(w, "\ngoals")
	for _, g := range goals {
		mark := "met    "
		if !g.Met {
			mark = "NOT MET"
		}
		got, want := goalText(g)
		fmt.Fprintf(w, "  %s  %-48s %s (want %s)\n", mark, g.Name, got, want)
	}
}

// goalText is what a goal measured and wants, each with its unit
// (memory in KiB).
func goalText(g lab.Goal) (got, want string) {
	got, unit, want := fmt.Sprintf("%.3g", g.Got), g.Unit, g.Want
	if unit == "B" { // memory reads better in KiB
		got, unit = fmt.Sprintf("%.1f", g.Got/1024), "KiB"
		if op, n, ok := strings.Cut(g.Want, " "); ok {
			if v, err := strconv.ParseFloat(n, 64); err == nil {
				want = fmt.Sprintf("%s %.0f", op, v/1024)
			}
		}
	}
	return got + " " + unit, want + " " + unit
}

func printRegistry(w io.Writer, r *lab.RegistryReport) {
	fmt.Fprintf(w, "registry of %d devices (%d requests in flight), %.1f s in all\n\n", r.Devices, r.Workers, r.Seconds)
	fmt.Fprintf(w, "registering            %.0f devices/s (%.1f s)\n", r.FillPerSecond, r.FillSeconds)
	for _, a := range []struct {
		what string
		c    lab.AddCost
	}{{"one add near the start", r.AddFirst}, {"one add at N", r.AddLast}} {
		fmt.Fprintf(w, "%-22s p50 %.2f ms, p99 %.2f ms, key-server CPU %.2f ms (%d adds after %d devices)\n", a.what, a.c.P50ms, a.c.P99ms, a.c.ServerCPUms, a.c.Adds, a.c.DevicesBefore-1)
	}
	fmt.Fprintf(w, "add at N / near start  %.2fx\n", r.AddRatio)
	fmt.Fprintf(w, "status                 %.2f s; with the visibility map %.2f s\n", r.StatusSeconds, r.MapSeconds)
	fmt.Fprintf(w, "dry run of an add      %.2f s\n", r.DryRunSeconds)
	fmt.Fprintf(w, "restart until ready    %.2f s (store %.1f MiB, audit log %.1f MiB; key server RSS before it %.0f MiB)\n", r.RestartReadySeconds, float64(r.StoreBytes)/(1<<20), float64(r.AuditBytes)/(1<<20), r.ServerRSSBytes/(1<<20))
	printGoals(w, r.Goals)
}

func printSAS(w io.Writer, r *lab.SASReport) {
	mib := func(v float64) string { return fmt.Sprintf("%.1f MiB", v/(1<<20)) }
	fmt.Fprintf(w, "SAs on one server agent: %d (%d clients at once), %.1f s in all\n\n", r.Count, r.Clients, r.Seconds)
	fmt.Fprintf(w, "handshakes/s           %.0f (first tenth %.0f, last tenth %.0f)\n", r.Rate, r.RateFirst, r.RateLast)
	fmt.Fprintf(w, "handshake latency      p50 %.2f ms, p99 %.2f ms (%d retries, %d cookie replies)\n", r.P50ms, r.P99ms, r.Retries, r.Cookies)
	fmt.Fprintf(w, "server memory          RSS %s with %.0f SAs: %.0f B per SA (heap %.0f B per SA)\n", mib(r.ServerRSS), r.ServerSAs, r.RSSPerSA, r.HeapPerSA)
	fmt.Fprintf(w, "server CPU             %.2f s per 1,000 handshakes\n", r.CPUPer1000)
	fmt.Fprintf(w, "hierarchy keys held    %.0f\n", r.HierarchyKeys)
	var reqs []string
	for _, rpc := range slices.Sorted(maps.Keys(r.ServerRequests)) {
		reqs = append(reqs, fmt.Sprintf("%s %.0f", rpc, r.ServerRequests[rpc]))
	}
	fmt.Fprintf(w, "key-service requests   %s (the server's, whole run)\n", strings.Join(reqs, ", "))
	fmt.Fprintf(w, "rotation               %.0f key-service request(s); %d of %d SAs re-established in %.1f s (grace %.0f s)\n",
		r.RotationFetches, r.RotationRekeyed, r.Count, r.RotationSeconds, r.GraceSeconds)
	fmt.Fprintf(w, "sample pings           %d sent, %d lost (%d of them before the rotation)\n", r.SamplePingsSent, r.SamplePingsLost, r.SamplePingsLostBefore)
	for _, l := range r.SampleLost {
		fmt.Fprintf(w, "  lost: SA %d seq %d, sent %+d ms from the rotation on SPI %s (re-established: %v)\n", l.SA, l.Seq, l.SentMs, l.SPI, l.Rekeyed)
	}
	if r.SampleUnknownSPI+r.SampleUnopened+r.SampleSendErrors > 0 {
		fmt.Fprintf(w, "  replies with no sample SA's SPI %d, not opened %d; pings not sent %d\n", r.SampleUnknownSPI, r.SampleUnopened, r.SampleSendErrors)
	}
	if len(r.RotationDrops) > 0 || r.RotationUDPErrors > 0 {
		causes := slices.Sorted(maps.Keys(r.RotationDrops))
		var parts []string
		for _, c := range causes {
			parts = append(parts, fmt.Sprintf("%s %.0f", c, r.RotationDrops[c]))
		}
		fmt.Fprintf(w, "  during the rotation: server drops [%s]; UDP receive-buffer overflows %d\n", strings.Join(parts, ", "), r.RotationUDPErrors)
	}
}

func newBenchWatchersCmd(streams IO) *cobra.Command {
	var cfg lab.WatchersConfig
	var asJSON, check bool
	c := &cobra.Command{
		Use:   "watchers [--watchers W] [--opening K] [--transport watch|grpc] [--fetch] [--json] [--check]",
		Short: "One key server with W watch streams: memory per watcher, a rotation reaching them all",
		Long: `Start a key server (a process of this binary, on a bbolt store in a
temporary directory), register W servers and open one watch stream for each
over its own mutual-TLS connection made with its own certificate, as W
agents would (K connections being opened at once). Then rotate their pair
now and measure how long until every watcher has heard of it.

--transport grpc watches over gRPC's stream, as agents built before the
watch transport do (and agents in front of a key server built before it):
the baseline the default is measured against. --fetch makes each watcher
also fetch its keys over gRPC and keep that connection, as a server agent
does for 30 s after each call (after a rotation, every one of
them): the cost of an agent at its peak, not only of its watch.

It reports the key server's memory per watcher (resident and Go heap, over
that before the watchers), its CPU per watch opened and per watcher told
of the rotation, and the rotation's median and last arrival; then the goals
of the fleet-scale work (issue 36) met or not; --check exits 1 when one is
not met. The generator and the key server hold W connections each (2W
with --fetch): allow W + 500 open files (2W + 500), ulimit -n; a lower
limit is refused before anything starts.`,
		Example: `  enclave bench watchers --watchers 2000
  enclave bench watchers --watchers 10000 --json > watchers.json
  enclave bench watchers --watchers 10000 --transport grpc --json > watchers-grpc.json
  enclave bench watchers --watchers 10000 --fetch --json > watchers-fetch.json`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if cfg.Watchers < 10 || cfg.Watchers > 100_000 {
				return usagef("--watchers %d: want 10 to 100000", cfg.Watchers)
			}
			if cfg.Opening < 1 || cfg.Opening > 1024 {
				return usagef("--opening %d: want 1 to 1024", cfg.Opening)
			}
			if cfg.Transport != "watch" && cfg.Transport != "grpc" {
				return usagef("--transport %q: want watch or grpc", cfg.Transport)
			}
			cfg.Progress, cfg.Terminal = streams.Err, isTerminal(streams.Err)
			return runBench(cmd.Context(), streams, asJSON, check, func(ctx context.Context) (*lab.WatchersReport, error) { return lab.RunWatchers(ctx, cfg) },
				printWatchers, func(r *lab.WatchersReport) []lab.Goal { return r.Goals })
		},
	}
	fl := c.Flags()
	fl.IntVar(&cfg.Watchers, "watchers", 10_000, "watch streams, one per server and connection (10 to 100000)")
	fl.IntVar(&cfg.Opening, "opening", 64, "connections being opened at once (1 to 1024)")
	fl.StringVar(&cfg.Transport, "transport", "watch", "what the watchers watch over: watch (the watch transport) or grpc")
	fl.BoolVar(&cfg.Fetch, "fetch", false, "each watcher also fetches its keys over gRPC and keeps the connection (a server agent after a call)")
	fl.BoolVar(&asJSON, "json", false, "print the report as JSON")
	fl.BoolVar(&check, "check", false, "exit 1 if a goal is not met")
	return c
}

func printWatchers(w io.Writer, r *lab.WatchersReport) {
	over := "the watch transport"
	if r.Transport == "grpc" {
		over = "gRPC streams"
	}
	if r.Fetch {
		over += ", each with a gRPC connection its keys came over"
	}
	fmt.Fprintf(w, "%d watchers on one key server over %s, %.1f s in all\n\n", r.Watchers, over, r.Seconds)
	fmt.Fprintf(w, "opening                %.1f s; key-server CPU %.2f ms per watch opened\n", r.OpenSeconds, r.CPUPerWatcherMs)
	fmt.Fprintf(w, "key-server memory      %.1f KiB resident per watcher (heap %.1f KiB, stacks %.1f KiB); RSS %.0f MiB, %.0f goroutines\n", r.RSSPerWatcher/1024, r.HeapPerWatcher/1024, r.StackPerWatcher/1024, r.ServerRSSBytes/(1<<20), r.ServerGoroutines)
	fmt.Fprintf(w, "rotation               heard by %d of %d: median %.0f ms, all %.0f ms after the call; key-server CPU %.1f µs per watcher\n", r.RotationHeard, r.Watchers, r.RotationP50ms, r.RotationMaxMs, r.RotationCPUPerWatcherUs)
	printGoals(w, r.Goals)
}
