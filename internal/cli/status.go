package cli

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"maps"
	"math/bits"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/enclavekeys/enclave/internal/agent"
	"github.com/enclavekeys/enclave/internal/echo"
	"github.com/enclavekeys/enclave/internal/gateway"
	"github.com/enclavekeys/enclave/internal/handshake"
	"github.com/enclavekeys/enclave/internal/keyclient"
)

// The status socket: every agent and gateway answers `enclave status` on a
// Unix socket of its own (mode 0600: only its user reads it), with HTTP
// GET /status returning a statusReport as JSON. It shows what the process
// holds, never a key.

// statusReport is what a status socket answers.
type statusReport struct {
	Kind    string          `json:"kind"` // agent or gateway
	Version string          `json:"version"`
	Agent   *agent.Status   `json:"agent,omitempty"`
	Gateway *gateway.Status `json:"gateway,omitempty"`
	// Renewal is the certificate's self-renewal (nil: older processes).
	Renewal *RenewalStatus `json:"renewal,omitempty"`
}

// statusOff is the --status-socket value that turns the socket off.
const statusOff = "off"

// statusFlag adds --status-socket for a kind of process.
func statusFlag(fl *pflag.FlagSet, path *string, kind string) {
	fl.StringVar(path, "status-socket", "", "the Unix socket enclave status asks (default "+defaultStatusSocket(kind)+"; off: none)")
}

// defaultStatusDir is where status sockets live unless --status-socket
// says otherwise: /run/enclave for root, the user's runtime directory (or
// a private directory under the temporary one) for others.
// (A variable so that tests can point it elsewhere.)
var defaultStatusDir = func() string {
	if os.Geteuid() == 0 {
		return "/run/enclave"
	}
	if d := os.Getenv("XDG_RUNTIME_DIR"); d != "" {
		return filepath.Join(d, "enclave")
	}
	return filepath.Join(os.TempDir(), fmt.Sprintf("enclave-%d", os.Getuid()))
}

// defaultStatusSocket is the socket of a kind of process (agent, gateway).
func defaultStatusSocket(kind string) string {
	return filepath.Join(defaultStatusDir(), kind+".sock")
}

// serveStatus answers status requests on the socket at path (empty: the
// kind's default; "off": none) with report. A socket that answers belongs
// to a running process: given explicitly, that is an error; the default
// one is then left to it, and this process runs without (logged). It
// returns a function that closes and removes the socket.
func serveStatus(path, kind string, report func() statusReport, log *slog.Logger) (func(), error) {
	if path == statusOff {
		return func() {}, nil
	}
	explicit := path != ""
	if !explicit {
		path = defaultStatusSocket(kind)
		if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
			log.Warn("no status socket: its directory cannot be made (give --status-socket PATH)", "path", path, "err", err)
			return func() {}, nil
		}
		if err := ownDir(filepath.Dir(path)); err != nil {
			log.Warn("no status socket: its directory is not this user's alone, so another user could answer enclave status in this process's place (remove the directory, or give --status-socket PATH)", "path", path, "err", err)
			return func() {}, nil
		}
	}
	if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
		c.Close()
		if explicit {
			return nil, usagef("--status-socket %s: another process answers on it", path)
		}
		log.Warn("no status socket: another process answers on the default one (give --status-socket PATH)", "path", path)
		return func() {}, nil
	}
	if st, err := os.Lstat(path); err == nil {
		if st.Mode()&os.ModeSocket == 0 {
			return nil, usagef("--status-socket %s: a file that is no socket is there", path)
		}
		os.Remove(path) // a socket left by a process that ended
	}
	ln, err := listenPrivate(path)
	if err != nil {
		if explicit {
			return nil, usagef("--status-socket: %w", err)
		}
		log.Warn("no status socket (give --status-socket PATH)", "path", path, "err", err)
		return func() {}, nil
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /status", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(report())
	})
	hs := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go hs.Serve(ln)
	log.Info("status socket", "path", path)
	return func() {
		hs.Close()
		os.Remove(path)
	}, nil
}

// fetchStatus asks the status socket at path, if it can be trusted
// (trustedSocket).
func fetchStatus(ctx context.Context, path string) (statusReport, error) {
	if err := trustedSocket(path); err != nil {
		return statusReport{}, err
	}
	client := &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		},
	}}
	var r statusReport
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://status/status", nil)
	if err != nil {
		return r, err
	}
	resp, err := client.Do(req)
	if err != nil {
		return r, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return r, fmt.Errorf("%s answered %s", path, resp.Status)
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, 64<<20)).Decode(&r); err != nil {
		return r, fmt.Errorf("%s: %w", path, err)
	}
	return r, nil
}

func newStatusCmd(streams IO) *cobra.Command {
	var socket string
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "status [--socket PATH] [--json]",
		Short: "Show what a running agent or gateway holds: identity, key service, keys, peers and SAs, pairs read",
		Long: `Show what the agent or gateway running on this host holds, as wg show and
tailscale status do: for an agent, its identity, key service connection,
the server keys it holds (identifiers only) and one block per peer with its
SAs (SPIs, VC, generation, age, expiry, packets and bytes each way, last
packet); for a gateway, its mode, the pairs it reads (by pair key or by
direct key exchange), the pairs it passes unread, live flows and packets
by outcome (the drops say why). No key is ever shown.

Each process answers on its status socket (--status-socket of enclave
agent and enclave gateway; by default ` + defaultStatusSocket("agent") + ` and
` + defaultStatusSocket("gateway") + ` for this user). Without --socket,
both default sockets are asked.

Examples:
  enclave status
  enclave status --socket /run/enclave/agent.sock --json`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			paths := []string{socket}
			if socket == "" {
				paths = []string{defaultStatusSocket("agent"), defaultStatusSocket("gateway")}
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), 5*time.Second)
			defer cancel()
			var reports []statusReport
			var errs []string
			for _, p := range paths {
				r, err := fetchStatus(ctx, p)
				if err != nil {
					if socket != "" || !isRefused(err) {
						errs = append(errs, err.Error())
					}
					continue
				}
				reports = append(reports, r)
			}
			if len(reports) == 0 {
				if len(errs) > 0 {
					return failed(fmt.Errorf("status: %s", strings.Join(errs, "; ")))
				}
				return failed(fmt.Errorf("no agent or gateway is running here (no answer on %s); start one with enclave agent or enclave gateway, or give --socket PATH", strings.Join(paths, " or ")))
			}
			if asJSON {
				enc := json.NewEncoder(streams.Out)
				enc.SetIndent("", "  ")
				if len(reports) == 1 {
					return enc.Encode(reports[0])
				}
				return enc.Encode(reports)
			}
			now := time.Now()
			for i, r := range reports {
				if i > 0 {
					fmt.Fprintln(streams.Out)
				}
				switch {
				case r.Agent != nil:
					printAgentStatus(streams.Out, r.Agent, r.Renewal, now)
				case r.Gateway != nil:
					printGatewayStatus(streams.Out, r.Gateway, r.Renewal, now)
				}
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&socket, "socket", "", "the status socket to ask (default: this host's agent's and gateway's)")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}

// isRefused reports whether err is a socket nobody listens on (or none).
func isRefused(err error) bool {
	return errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, fs.ErrNotExist)
}

// ago says how long before now t was, briefly ("3s ago", "never").
func ago(t, now time.Time) string {
	switch {
	case t.IsZero():
		return "never"
	case now.Sub(t) < time.Second:
		return "just now"
	}
	return short(now.Sub(t)) + " ago"
}

// short rounds a duration for people: 3s, 4m10s, 2h3m.
func short(d time.Duration) string {
	if d < 0 {
		return "-" + short(-d)
	}
	if r := d.Round(time.Second); r < time.Hour {
		return r.String()
	}
	return strings.TrimSuffix(d.Round(time.Minute).String(), "0s")
}

// bytesIEC says a byte count briefly: 512 B, 1.5 KiB, 3.2 MiB. The unit
// is the largest power of 1024 not above n, read off n's bit length; a
// value that would round up to 1024.0 of a unit is said in the next one.
// parseSize reads a size in bytes: a number with an optional unit (B, KiB,
// MiB, GiB, TiB; KB, MB, GB, TB as powers of 1000).
func parseSize(s string) (int64, error) {
	t := strings.TrimSpace(s)
	i := len(t)
	for i > 0 && (t[i-1] < '0' || t[i-1] > '9') {
		i--
	}
	num, unit := strings.TrimSpace(t[:i]), strings.TrimSpace(t[i:])
	mult := map[string]float64{"": 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}[unit]
	v, err := strconv.ParseFloat(num, 64)
	if err != nil || mult == 0 || v < 0 || v*mult > 1<<62 {
		return 0, fmt.Errorf("%q: want a size such as 100MiB, 2GiB or 500000000", echo.Cut(s))
	}
	return int64(v * mult), nil
}

func bytesIEC(n uint64) string {
	units := [...]string{"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"}
	if n < 1024 {
		return strconv.FormatUint(n, 10) + " B"
	}
	step := (bits.Len64(n) - 1) / 10
	v := float64(n) / float64(uint64(1)<<(10*step))
	if v >= 1023.95 && step < len(units)-1 {
		step++
		v /= 1024
	}
	return strconv.FormatFloat(v, 'f', 1, 64) + " " + units[step]
}

func printKeyService(w io.Writer, ks *keyclient.Connection, now time.Time) {
	if ks.State == keyclient.Revoked {
		fmt.Fprintf(w, "  REVOKED (since %s): this device's SAs ended and it makes no new ones; a device that should work again needs a new identity\n", ago(ks.Since, now))
	}
	fmt.Fprintf(w, "  key service %s: %s (since %s)", ks.Address, ks.State, ago(ks.Since, now))
	if ks.LastError != "" {
		fmt.Fprintf(w, " (last error %s: %s)", ago(ks.ErrorAt, now), ks.LastError)
	}
	fmt.Fprintln(w)
}

func printAgentStatus(w io.Writer, s *agent.Status, ren *RenewalStatus, now time.Time) {
	fmt.Fprintf(w, "agent %s (%s)\n", s.Name, s.Identity)
	enclave := "none in its certificate"
	if s.Enclave != 0 {
		enclave = fmt.Sprint(s.Enclave)
	}
	dev := "in-process network stack"
	if s.TUN != "" {
		dev = "TUN " + s.TUN
	}
	fmt.Fprintf(w, "  %s, enclave %s, overlay %s, data %s, %s, up %s\n", s.Role, enclave, s.Overlay, s.Data, dev, short(now.Sub(s.Started)))
	if s.Via != "" {
		fmt.Fprintf(w, "  through the relay %s\n", s.Via)
	}
	printCertExpiry(w, s.CertExpires, now)
	if l := renewalLine(ren); l != "" {
		fmt.Fprintln(w, "  "+l)
	}
	if s.KeyService != nil {
		printKeyService(w, s.KeyService, now)
	}
	if len(s.ServerKeys) > 0 {
		var ks []string
		for _, k := range s.ServerKeys {
			x := fmt.Sprintf("%s generation %d", k.Pair, k.Generation)
			if k.Current {
				x += " (current)"
			}
			ks = append(ks, x)
		}
		fmt.Fprintf(w, "  server keys: %s\n", strings.Join(ks, ", "))
	}
	if s.Handshakes > 0 {
		fmt.Fprintf(w, "  handshakes in flight: %d\n", s.Handshakes)
	}
	if len(s.Peers) == 0 {
		fmt.Fprintln(w, "  no peers yet")
	}
	for _, p := range s.Peers {
		fmt.Fprintf(w, "\npeer %s (%s) at %s, last handshake %s\n", p.Name, p.Overlay, p.Endpoint, ago(p.LastHandshake, now))
		for _, sa := range p.SAs {
			var tags []string
			if sa.Route {
				tags = append(tags, "sending")
			} else {
				tags = append(tags, "draining")
			}
			if sa.Server {
				tags = append(tags, "granted here")
			}
			fmt.Fprintf(w, "  SA %s generation %d, SPI in %s out %s [%s]\n", sa.VC, sa.Generation, sa.SPIIn, sa.SPIOut, strings.Join(tags, ", "))
			fmt.Fprintf(w, "    age %s, expires in %s\n", short(now.Sub(sa.Created)), short(sa.Expires.Sub(now)))
			fmt.Fprintf(w, "    sent %d packets (%s), last %s; received %d packets (%s), last %s\n",
				sa.TxPackets, bytesIEC(sa.TxBytes), ago(sa.LastSent, now), sa.RxPackets, bytesIEC(sa.RxBytes), ago(sa.LastRecv, now))
		}
	}
}

func printGatewayStatus(w io.Writer, s *gateway.Status, ren *RenewalStatus, now time.Time) {
	fmt.Fprintf(w, "gateway %s (%s), enclave %d\n", s.Name, s.Identity, s.Enclave)
	switch s.Mode {
	case "relay":
		to := "any destination (an open relay)"
		if len(s.RelayTo) > 0 {
			to = strings.Join(s.RelayTo, ", ")
		}
		fmt.Fprintf(w, "  relay at %s, forwarding to %s, up %s\n", s.Relay, to, short(now.Sub(s.Started)))
		printCertExpiry(w, s.CertExpires, now)
	default:
		fmt.Fprintf(w, "  inline on netfilter queues %v (fail %s), up %s\n", s.Queues, map[bool]string{true: "open", false: "closed"}[s.FailOpen], short(now.Sub(s.Started)))
		printCertExpiry(w, s.CertExpires, now)
		if s.RunSizes != "" {
			fmt.Fprintf(w, "  runs: %s\n", s.RunSizes)
		}
	}
	if l := renewalLine(ren); l != "" {
		fmt.Fprintln(w, "  "+l)
	}
	printKeyService(w, &s.KeyService, now)
	list := func(xs []string) string {
		if len(xs) == 0 {
			return "none"
		}
		return strings.Join(xs, ", ")
	}
	fmt.Fprintf(w, "  granted pairs: %s\n", list(s.Granted))
	for _, p := range sortedKeys(s.Blind) {
		b := s.Blind[p]
		switch {
		case !b.Since.IsZero():
			how := "its clients are told to make new SAs"
			if !s.TellsClients {
				how = "the gateway cannot tell its clients (no CAP_NET_RAW): held until they make new SAs on their own"
			}
			fmt.Fprintf(w, "  pair %s held unread for %s: the gateway cannot read its SAs yet; %s\n", p, short(now.Sub(b.Since)), how)
		case b.Last > 0:
			fmt.Fprintf(w, "  pair %s was last held unread for %s, %s ago\n", p, time.Duration(b.Last*float64(time.Second)).Round(time.Millisecond), short(now.Sub(b.LastEnded)))
		}
	}
	how := "pair keys held"
	if s.NoDerive {
		how = "pair keys held (--no-derive: none, SA keys by direct key exchange)"
	}
	fmt.Fprintf(w, "  %s: %s\n", how, list(s.PairKeys))
	if len(s.Delivered) > 0 {
		var ds []string
		for _, p := range sortedKeys(s.Delivered) {
			ds = append(ds, fmt.Sprintf("%s: %d", p, s.Delivered[p]))
		}
		fmt.Fprintf(w, "  SA keys by direct key exchange: %s\n", strings.Join(ds, ", "))
	}
	fmt.Fprintf(w, "  live flows: %d, sessions with servers: %d\n", s.Flows, s.Sessions)
	for _, p := range sortedKeys(s.Pairs) {
		fmt.Fprintf(w, "  pair %s: %s\n", p, outcomes(s.Pairs[p]))
	}
	for _, k := range sortedKeys(s.Packets) {
		fmt.Fprintf(w, "  %s packets: %s\n", k, outcomes(s.Packets[k]))
	}
	if len(s.Runs) > 0 {
		runs := maps.Clone(s.Runs)
		datagrams := runs["datagrams"]
		delete(runs, "datagrams")
		fmt.Fprintf(w, "  runs taken whole: %s (%d datagrams in them)\n", outcomes(runs), datagrams)
		if bad := runs["size_unknown"] + runs["malformed"]; bad > 0 {
			fmt.Fprintf(w, "  warning: %d runs dropped unread (no known segment size, or a UDP length that leaves part out): see the gateway's log\n", bad)
		}
	}
}

func outcomes(m map[string]uint64) string {
	var out []string
	for _, o := range sortedKeys(m) {
		out = append(out, fmt.Sprintf("%s %d", strings.ReplaceAll(o, "_", " "), m[o]))
	}
	return strings.Join(out, ", ")
}

func sortedKeys[V any](m map[string]V) []string { return slices.Sorted(maps.Keys(m)) }

// printCertExpiry says when a device's certificate expires, flagged within
// handshake.CertWarnBefore and after.
func printCertExpiry(w io.Writer, end, now time.Time) {
	if end.IsZero() {
		return
	}
	switch left := end.Sub(now); {
	case left <= 0:
		fmt.Fprintf(w, "  certificate EXPIRED %s ago: no new SA; renew it (enclave cert renew, or a new join) and send SIGHUP\n", short(-left))
	case left < handshake.CertWarnBefore:
		fmt.Fprintf(w, "  certificate expires in %s (%s): renew it soon; every SA ends with it\n", short(left), end.UTC().Format(time.RFC3339))
	default:
		fmt.Fprintf(w, "  certificate expires %s\n", end.UTC().Format("2006-01-02"))
	}
}
