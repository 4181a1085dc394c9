package cli

import (
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"os"
	"os/signal"
	"slices"
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
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			cfg.Progress, cfg.Terminal = streams.Err, isTerminal(streams.Err)
			rep, err := lab.RunSAS(ctx, cfg)
			if err != nil {
				return failed(err)
			}
			if asJSON {
				enc := json.NewEncoder(streams.Out)
				enc.SetIndent("", "  ")
				return enc.Encode(rep)
			}
			printSAS(streams.Out, rep)
			return nil
		},
	}
	fl := sas.Flags()
	fl.IntVar(&cfg.Count, "count", 2000, "SAs to bring up")
	fl.IntVar(&cfg.Clients, "clients", 64, "handshakes in flight at once")
	fl.IntVar(&cfg.Sample, "sample", 100, "SAs that carry pings across the rotation")
	fl.DurationVar(&cfg.Spread, "spread", 0, "the server's rekey spread after the rotation (default and at most half the grace, which is 30 s or 3 ms per SA)")
	fl.DurationVar(&cfg.Duration, "duration", time.Second, "how long the sample carries traffic before the rotation")
	fl.BoolVar(&asJSON, "json", false, "print the report as JSON")
	cmd.AddCommand(sas)
	return cmd
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
