package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/control"
	"github.com/enclavekeys/enclave/internal/echo"
	"github.com/enclavekeys/enclave/internal/fileread"
	"github.com/enclavekeys/enclave/internal/gateway"
)

// gatewayConfig holds the gateway's settings; the YAML names are the flag
// names, and flags given on the command line win.
type gatewayConfig struct {
	CA            string        `yaml:"ca"`
	Cert          string        `yaml:"cert"`
	Key           string        `yaml:"key"`
	Keyserver     string        `yaml:"keyserver"`
	ServerName    string        `yaml:"server-name"`
	NFQueue       string        `yaml:"nfqueue"`
	Relay         string        `yaml:"relay"`
	RelayTo       []string      `yaml:"relay-to"`
	OpenRelay     bool          `yaml:"open-relay"`
	DataPort      uint16        `yaml:"data-port"`
	FlowLog       string        `yaml:"flow-log"`
	FlowIdle      time.Duration `yaml:"flow-idle"`
	Pcap          string        `yaml:"pcap"`
	PcapMaxSize   string        `yaml:"pcap-max-size"`
	PcapKeep      int           `yaml:"pcap-keep"`
	Policy        string        `yaml:"policy"`
	NoDerive      bool          `yaml:"no-derive"`
	FailOpen      bool          `yaml:"fail-open"`
	RunsByDgram   bool          `yaml:"runs-by-datagram"`
	MetricsListen string        `yaml:"metrics-listen"`
	LogFormat     string        `yaml:"log-format"`
	LogLevel      string        `yaml:"log-level"`
	StatusSocket  string        `yaml:"status-socket"`
	RenewBefore   string        `yaml:"renew-before"`
	RenewDir      string        `yaml:"renew-dir"`
}

func newGatewayCmd(streams IO) *cobra.Command {
	var cfg gatewayConfig
	var configFile string
	cmd := &cobra.Command{
		Use:   "gateway --ca CA.crt --cert C --key K --keyserver ADDR (--nfqueue N[,N...] | --relay IP:PORT) [flags]",
		Short: "Run a gateway between enclaves: tag handshakes, read the pairs it is granted, enforce policy",
		Long: `Run an Enclave gateway (DESIGN §5.3, §5.5, §5.6, §7): an intermediary on
the path between enclaves. Its certificate is a gateway's (enclave cert
issue --role gateway --enclave I, where I is the enclave it stands in), and
it is registered with that role.

It appends its signed entry to every handshake it forwards, so that
servers learn which enclave a client is in; reads the data packets of the
enclave pairs it is granted (admin grant), with the pair keys the key
service gives it; passes everything else untouched, counted as opaque by
pair; and writes what it reads to a JSON-lines flow log (--flow-log FILE,
a line per flow when it has been idle --flow-idle, or the gateway stops)
and a pcapng of the decrypted inner packets (--pcap FILE, each packet's
comment names its SA; Wireshark and tshark read it). --policy FILE is an
allow/deny policy by inner 5-tuple and pair (YAML; see docs/ARCHITECTURE.md),
enforced on what it reads.

--no-derive makes it a device that cannot derive keys: it holds no pair
key, asks the servers for each SA's keys (need-key, direct key exchange),
and for SAs formed before it started, asks the server to re-establish them
through it (late join). A gateway with a pair key can skip both.

Two modes, one core:

  --relay IP:PORT   a UDP relay, no privileges: agents started with
                    --via IP:PORT send through it (data on PORT, control on
                    the next port). --relay-to PREFIX limits where it
                    forwards (repeat); a relay that should forward
                    anywhere, for whoever reaches it, must say
                    --open-relay.
  --nfqueue N,...   inline on a Linux router (CAP_NET_ADMIN, CAP_BPF and
                    CAP_NET_RAW; Linux 6.6 or later): the router's
                    iptables sends the forwarded data and control packets
                    to these netfilter queues, e.g.
                      iptables-legacy -I FORWARD -p udp -m multiport \
                        --ports 1000,1001 -j NFQUEUE --queue-balance 0:1
                    (-I: before any rule that accepts forwarded traffic).
                    Several queues spread the work over the cores.
                    --fail-open makes the kernel pass packets when the
                    queues are full and the gateway pass packets it fails
                    on; add --queue-bypass to the rule to pass traffic
                    while no gateway runs (without it, traffic stops).
                    --data-port is the agents' data port (default 1000).
                    Segmentation-offloaded runs are taken whole and cut
                    at the segment size the kernel will cut them at (a
                    small BPF program at every interface's ingress puts
                    it in the packet's mark until the verdict); where it
                    cannot run, or with --runs-by-datagram, the kernel
                    queues every datagram alone (slower, as exact). Marks
                    0xE5C0xxxx are the gateway's: mark no data-port
                    packet before the queue.
                    The packets of a granted pair's SA the gateway cannot
                    read yet (a --no-derive gateway just restarted) are
                    dropped until it can, and the SA's client is told to
                    make a new SA (tens of milliseconds); --fail-open
                    passes them unread instead.

Prometheus metrics and /healthz are on --metrics-listen. --config FILE
reads the same settings from YAML.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if configFile != "" {
				if err := mergeConfigFile(configFile, &cfg, cmd.Flags()); err != nil {
					return err
				}
			}
			return runGateway(cmd.Context(), streams, cfg)
		},
	}
	fl := cmd.Flags()
	deviceFlags(fl, deviceSettings{&configFile, &cfg.CA, &cfg.Cert, &cfg.Key, &cfg.Keyserver, &cfg.ServerName, &cfg.RenewBefore, &cfg.RenewDir},
		"this gateway's certificate (role gateway, with its enclave)", "the key service address, or replicas' addresses A,B,... (fails over; waited for if not up)")
	fl.StringVar(&cfg.NFQueue, "nfqueue", "", "inline: the netfilter queue numbers, N[,N...] or A-B")
	fl.StringVar(&cfg.Relay, "relay", "", "relay: listen on IP:PORT for data and the next port for control")
	fl.StringArrayVar(&cfg.RelayTo, "relay-to", nil, "relay: forward only to this underlay prefix (repeat; a relay needs it, or --open-relay)")
	fl.BoolVar(&cfg.OpenRelay, "open-relay", false, "relay: forward to any destination for anyone who reaches it (without --relay-to)")
	fl.Uint16Var(&cfg.DataPort, "data-port", control.DefaultDataPort, "inline: the agents' data port (control is the next)")
	fl.StringVar(&cfg.FlowLog, "flow-log", "", "append a JSON line per flow to this file")
	fl.DurationVar(&cfg.FlowIdle, "flow-idle", gateway.DefaultFlowIdle, "a flow's line is written after it has been idle this long (at most a quarter of it later)")
	fl.StringVar(&cfg.Pcap, "pcap", "", "write the decrypted inner packets to this pcapng file")
	fl.StringVar(&cfg.PcapMaxSize, "pcap-max-size", "100MiB", "rotate --pcap at this size (FILE becomes FILE.1; 0: never)")
	fl.IntVar(&cfg.PcapKeep, "pcap-keep", 3, "older --pcap files kept (FILE.1 to FILE.N)")
	fl.StringVar(&cfg.Policy, "policy", "", "allow/deny policy (YAML)")
	fl.BoolVar(&cfg.NoDerive, "no-derive", false, "hold no pair key: get each SA's keys by direct key exchange")
	fl.BoolVar(&cfg.FailOpen, "fail-open", false, "pass packets the gateway cannot take or fails on, instead of dropping them")
	fl.BoolVar(&cfg.RunsByDgram, "runs-by-datagram", false, "inline: take no segmentation-offloaded run whole; the kernel queues each datagram alone")
	fl.StringVar(&cfg.MetricsListen, "metrics-listen", "", "address for /metrics and /healthz (empty: off)")
	logFlags(fl, &cfg.LogFormat, &cfg.LogLevel)
	statusFlag(fl, &cfg.StatusSocket, "gateway")
	return cmd
}

// parseQueues reads N[,N...] with A-B ranges (at most 64 queues).
func parseQueues(s string) ([]uint16, error) {
	var out []uint16
	bad := fmt.Errorf("--nfqueue %q: want queue numbers N[,N...] or A-B", echo.Cut(s))
	for _, part := range strings.Split(s, ",") {
		lo, hi, isRange := strings.Cut(strings.TrimSpace(part), "-")
		if !isRange {
			hi = lo
		}
		a, err1 := strconv.ParseUint(lo, 10, 16)
		b, err2 := strconv.ParseUint(hi, 10, 16)
		if err1 != nil || err2 != nil || a > b || len(out)+int(b-a) >= 64 {
			return nil, bad
		}
		for q := a; q <= b; q++ {
			out = append(out, uint16(q))
		}
	}
	return out, nil
}

func runGateway(ctx context.Context, streams IO, cfg gatewayConfig) error {
	for name, v := range map[string]string{"ca": cfg.CA, "cert": cfg.Cert, "key": cfg.Key, "keyserver": cfg.Keyserver} {
		if v == "" {
			return usagef("--%s is required", name)
		}
	}
	if (cfg.NFQueue == "") == (cfg.Relay == "") {
		return usagef("give one mode: --nfqueue N[,N...] (inline on a router) or --relay IP:PORT (a relay)")
	}
	gcfg := gateway.Config{NoDerive: cfg.NoDerive, FailOpen: cfg.FailOpen, RunsByDatagram: cfg.RunsByDgram, DataPort: cfg.DataPort, FlowIdle: cfg.FlowIdle}
	var err error
	if cfg.NFQueue != "" {
		if gcfg.Queues, err = parseQueues(cfg.NFQueue); err != nil {
			return usageError(err)
		}
	} else if gcfg.Relay, err = netip.ParseAddrPort(cfg.Relay); err != nil || gcfg.Relay.Port() == 0 {
		return usagef("--relay %q: want IP:PORT", echo.Cut(cfg.Relay))
	}
	for _, p := range cfg.RelayTo {
		pfx, err := netip.ParsePrefix(p)
		if err != nil {
			a, aerr := netip.ParseAddr(p)
			if aerr != nil {
				return usagef("--relay-to %q: want a prefix such as 10.0.0.0/8", echo.Cut(p))
			}
			pfx = netip.PrefixFrom(a, a.BitLen())
		}
		gcfg.RelayTo = append(gcfg.RelayTo, pfx.Masked())
	}
	gcfg.OpenRelay = cfg.OpenRelay
	if (len(gcfg.RelayTo) > 0 || cfg.OpenRelay) && cfg.Relay == "" {
		return usagef("--relay-to and --open-relay are for --relay")
	}
	if cfg.DataPort == 0 || cfg.DataPort == 65535 {
		return usagef("--data-port %d: want 1 to 65534 (control is the next port)", cfg.DataPort)
	}
	if cfg.FlowIdle < time.Second {
		return usagef("--flow-idle %v: want at least 1s", cfg.FlowIdle)
	}
	if cfg.Policy != "" {
		var err error
		if gcfg.Policy, err = readPolicy(cfg.Policy); err != nil {
			return err
		}
	}
	rb, err := parseRenewBefore(cfg.RenewBefore)
	if err != nil {
		return err
	}
	devFiles := newDeviceFiles(cfg.CA, cfg.Cert, cfg.Key, cfg.RenewDir)
	caPath, certPath, keyPath := devFiles.paths()
	creds, id, err := loadDevice(caPath, certPath, keyPath)
	if err != nil {
		return err
	}
	if id.Role != ca.RoleGateway && id.Role != ca.RoleMonitor {
		return usagef("this certificate is a %s's; a gateway needs one of role gateway (cert issue --role gateway --enclave I), or monitor", id.Role)
	}
	gcfg.Credentials = creds
	var files []io.Closer
	defer func() {
		for _, f := range files {
			f.Close()
		}
	}()
	if cfg.FlowLog != "" {
		f, err := os.OpenFile(cfg.FlowLog, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
		if err != nil {
			return fileError(fmt.Errorf("--flow-log: %w", err))
		}
		files = append(files, f)
		gcfg.FlowLog = f
	}
	if cfg.Pcap != "" {
		max, err := parseSize(cfg.PcapMaxSize)
		if err != nil {
			return usagef("--pcap-max-size: %v", err)
		}
		if cfg.PcapKeep < 0 {
			return usagef("--pcap-keep %d: want 0 or more", cfg.PcapKeep)
		}
		gcfg.CaptureFiles = &gateway.CaptureFiles{Path: cfg.Pcap, MaxSize: max, Keep: cfg.PcapKeep}
	}
	ksConn, live, err := dialKeyService(cfg.Keyserver, cfg.ServerName, caPath, certPath, keyPath)
	if err != nil {
		return err
	}
	defer ksConn.Close()
	log, err := newLogger(streams.Err, logSettings{cfg.LogFormat, cfg.LogLevel})
	if err != nil {
		return err
	}
	if gcfg.KeyService, err = keyServiceClient(ksConn, cfg.Keyserver, cfg.ServerName, live, log); err != nil {
		return err
	}
	gcfg.KeyServiceAddr = cfg.Keyserver
	gcfg.Logger = log
	g, err := gateway.New(gcfg)
	if err != nil {
		if errors.Is(err, gateway.ErrConfig) || errors.Is(err, gateway.ErrRole) {
			return usageError(err)
		}
		return failed(err)
	}
	defer g.Close()
	if devFiles.renewedAtStart {
		log.Info("starting with the renewed certificate in --renew-dir (issued after --cert, or --cert no longer verifies)", "cert", certPath)
	}
	ren := newRenewal(log, devFiles, rb, ksConn, func() error { return reloadDevice(log, devFiles, g.SetCredentials, live) })
	closeStatus, err := serveStatus(cfg.StatusSocket, "gateway", func() statusReport {
		s := g.Status()
		return statusReport{Kind: "gateway", Version: readBuildInfo().Version, Gateway: &s, Renewal: ren.status()}
	}, log)
	if err != nil {
		return err
	}
	defer closeStatus()
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stop()
	if cfg.MetricsListen != "" {
		closeMetrics, err := serveMetrics(cfg.MetricsListen, g.Metrics().Handler(), log)
		if err != nil {
			return err
		}
		defer closeMetrics()
	}
	// SIGHUP reloads the policy file and the credentials; a file that
	// does not parse, or credentials that do not verify, leave what is in
	// force as it is.
	onHUP(ctx, func() {
		if cfg.Policy != "" {
			if p, err := readPolicy(cfg.Policy); err != nil {
				log.ErrorContext(operatorAsked(ctx), "policy not reloaded: the one in force stays", "file", cfg.Policy, "err", err)
			} else if err := g.SetPolicy(p); err != nil {
				log.ErrorContext(operatorAsked(ctx), "policy not reloaded: the one in force stays", "file", cfg.Policy, "err", err)
			} else {
				log.Info("policy reloaded", "file", cfg.Policy, "rules", p.String())
			}
		}
		reloadDevice(log, devFiles, g.SetCredentials, live)
	})
	go ren.run(ctx)
	err = g.Run(ctx)
	logStopped(log, "gateway", ctx, err)
	if err != nil {
		return failed(err)
	}
	return nil
}

// readPolicy reads and parses a policy file.
func readPolicy(path string) (*gateway.Policy, error) {
	raw, err := fileread.Bounded(path, fileread.MaxConfig)
	if err != nil {
		return nil, fileError(fmt.Errorf("--policy: %w", err))
	}
	p, err := gateway.ParsePolicy(raw)
	if err != nil {
		return nil, usagef("--policy %s: %w", echo.Cut(path), err)
	}
	return p, nil
}
