package cli

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"google.golang.org/grpc"

	"github.com/enclavekeys/enclave/internal/agent"
	"github.com/enclavekeys/enclave/internal/api"
	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/control"
	"github.com/enclavekeys/enclave/internal/echo"
	"github.com/enclavekeys/enclave/internal/handshake"
	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/keyserver"
)

// agentConfig holds the agent's settings; the YAML names are the flag
// names, and flags given on the command line win.
type agentConfig struct {
	CA              string         `yaml:"ca"`
	Cert            string         `yaml:"cert"`
	Key             string         `yaml:"key"`
	Keyserver       string         `yaml:"keyserver"`
	ServerName      string         `yaml:"server-name"`
	Listen          string         `yaml:"listen"`
	Public          []string       `yaml:"public"`
	Netstack        bool           `yaml:"netstack"`
	TUN             string         `yaml:"tun"`
	MTU             int            `yaml:"mtu"`
	SOCKS5          string         `yaml:"socks5"`
	Expose          []string       `yaml:"expose"`
	Peers           []string       `yaml:"peer"`
	Via             string         `yaml:"via"`
	Enclave         keys.EnclaveID `yaml:"enclave"`
	TrustSelfReport bool           `yaml:"trust-self-report"`
	Lifetime        time.Duration  `yaml:"lifetime"`
	IdleTimeout     time.Duration  `yaml:"idle-timeout"`
	RekeySpread     time.Duration  `yaml:"rekey-spread"`
	MetricsListen   string         `yaml:"metrics-listen"`
	Pprof           bool           `yaml:"pprof"`
	LogFormat       string         `yaml:"log-format"`
	LogLevel        string         `yaml:"log-level"`
	StatusSocket    string         `yaml:"status-socket"`
	RenewBefore     string         `yaml:"renew-before"`
	RenewDir        string         `yaml:"renew-dir"`
}

func newAgentCmd(streams IO) *cobra.Command {
	var cfg agentConfig
	var configFile string
	var enclave enclaveFlag
	cmd := &cobra.Command{
		Use:   "agent --ca CA.crt --cert C --key K (--tun NAME | --netstack) [--keyserver ADDR] [--listen IP[:PORT]] [--peer PREFIX=HOST[:PORT]]... [flags]",
		Short: "Run the host agent: form SAs with other hosts and carry traffic over them",
		Long: `Run the Enclave host agent. It forms SAs with other hosts through the
control protocol (docs/PROTOCOL.md: Noise IX with the org CA's certificates,
enclave discovery, the SA grant) and carries IP traffic over them.

The agent's certificate must carry its overlay address (enclave cert issue
--ip 100.64.1.10/16). As a client it initiates SAs to the peers given with
--peer PREFIX=HOST[:PORT] (overlay prefix = the peer's underlay data
address, port 1000 by default); given --keyserver, it finds a server of its
overlay network it has no --peer for in the key service's endpoint
directory (each server registers its own endpoints there, signed; the
client checks the entry itself). A --peer wins over the directory. As a server (a server certificate and
--keyserver ADDR) it fetches its server keys from the key service, grants
SAs to the clients that reach it, follows rotations and revocations on the
key service's watch stream, and asks clients to re-establish before their
generation retires: after a rotation it spreads those requests over at most
--rekey-spread (and half the time the old generation has left), so that a
server of many SAs makes one key-service request and no storm of
handshakes. --idle-timeout ends SAs that received nothing for that long.

--listen IP[:PORT] is the data port (default 0.0.0.0:1000); the control
port is the next one (1001). Several agents share one host's loopback with
--listen 127.0.0.2:11000, --listen 127.0.0.3:11000, ...

--tun NAME carries the overlay on a kernel TUN device (root, or
CAP_NET_ADMIN): the agent creates it with --mtu (default 1380, which fits a
1500-byte underlay with the PSP overhead), gives it the certificate's
overlay address and network, and routes each --peer prefix outside that
network to it; unmodified programs then use overlay addresses directly.
--netstack runs the network stack in the process instead (no privileges):
programs reach overlay addresses through --socks5 ADDR (a SOCKS5 proxy:
curl --socks5 ADDR http://100.64.3.1/), and --expose PORT=HOST:PORT makes a
local TCP service reachable on this agent's overlay address at PORT.

--via IP:PORT sends every datagram through a relay gateway (enclave
gateway --relay IP:PORT): the peers stay as --peer names them, the relay
forwards to them and back, tagging handshakes and inspecting what it is
granted on the way.

A gateway on the way signs the destination it sent a handshake to, and a
server trusts only the entries naming its own control port: behind a NAT
(port forwarding), give the data endpoint clients reach it at with --public
IP:PORT (repeat), or clients without an enclave in their certificates are
not placed by those gateways.

--enclave I puts a self-report of this device's enclave in its handshakes
(for certificates that name none); a server believes it only with
--trust-self-report, and never over a certificate or a gateway's signed
entry. --lifetime is how long the SAs a server grants last (clients
re-establish a fifth of it before the end). Prometheus metrics and /healthz
are on --metrics-listen (with --pprof, Go's profiles too). --config FILE
reads the same settings from YAML.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if enclave.given() && enclave.id == 0 {
				return usagef("--enclave %s: the agent knows no layout; give the enclave's 16-bit id (enclave admin status shows the org's layout)", echo.Cut(enclave.raw))
			}
			cfg.Enclave = enclave.id
			if configFile != "" {
				if err := mergeConfigFile(configFile, &cfg, cmd.Flags()); err != nil {
					return err
				}
			}
			return runAgent(cmd.Context(), streams, cfg)
		},
	}
	fl := cmd.Flags()
	deviceFlags(fl, deviceSettings{&configFile, &cfg.CA, &cfg.Cert, &cfg.Key, &cfg.Keyserver, &cfg.ServerName, &cfg.RenewBefore, &cfg.RenewDir},
		"this device's certificate (with its overlay address)", "the key service address, or replicas' addresses A,B,... (servers: their keys, rotations, revocations; clients: revocations, so that a revoked server is refused; fails over; waited for if not up)")
	fl.StringVar(&cfg.Listen, "listen", "0.0.0.0:1000", "the data port's address IP[:PORT]; the control port is the next")
	fl.StringArrayVar(&cfg.Public, "public", nil, "servers: IP:PORT, a data endpoint clients reach this server at through a NAT (repeat); gateways' entries naming it are trusted")
	fl.StringVar(&cfg.TUN, "tun", "", "carry the overlay on this kernel TUN device (created; needs CAP_NET_ADMIN)")
	fl.BoolVar(&cfg.Netstack, "netstack", false, "run the network stack in the process instead of a TUN device (no privileges)")
	fl.IntVar(&cfg.MTU, "mtu", agent.DefaultMTU, "the overlay MTU (inner packets), at most the underlay's less the PSP overhead")
	fl.StringVar(&cfg.SOCKS5, "socks5", "", "serve a SOCKS5 proxy into the overlay at this address (netstack)")
	fl.StringArrayVar(&cfg.Expose, "expose", nil, "PORT=HOST:PORT: make a local TCP service reachable on this agent's overlay address (repeat)")
	fl.StringArrayVar(&cfg.Peers, "peer", nil, "PREFIX=HOST[:PORT]: initiate SAs for this overlay prefix at this underlay data address (repeat)")
	fl.StringVar(&cfg.Via, "via", "", "IP:PORT: send through this relay gateway's data port (its control port is the next)")
	fl.Var(&enclave, "enclave", "self-report this enclave in handshakes")
	fl.BoolVar(&cfg.TrustSelfReport, "trust-self-report", false, "servers: accept a client's self-reported enclave when nothing better names it")
	fl.DurationVar(&cfg.Lifetime, "lifetime", agent.DefaultLifetime, "servers: how long a granted SA lasts")
	fl.DurationVar(&cfg.IdleTimeout, "idle-timeout", 0, "servers: end SAs that received nothing for this long (0: at the end of their lifetime)")
	fl.DurationVar(&cfg.RekeySpread, "rekey-spread", agent.DefaultRekeySpread, "servers: spread the rekey notices of a rotation over at most this long")
	fl.StringVar(&cfg.MetricsListen, "metrics-listen", "", "address for /metrics and /healthz (empty: off)")
	logFlags(fl, &cfg.LogFormat, &cfg.LogLevel)
	statusFlag(fl, &cfg.StatusSocket, "agent")
	fl.BoolVar(&cfg.Pprof, "pprof", false, "also serve Go's /debug/pprof profiles on --metrics-listen (keep it on a local address)")
	return cmd
}

// parseListen reads IP[:PORT] (port 1000 when left out).
func parseListen(s string) (netip.AddrPort, error) {
	if ap, err := netip.ParseAddrPort(s); err == nil {
		return ap, nil
	}
	a, err := netip.ParseAddr(strings.Trim(s, "[]"))
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("--listen %q: want IP[:PORT]", echo.Cut(s))
	}
	return netip.AddrPortFrom(a, control.DefaultDataPort), nil
}

// parsePeer reads PREFIX=HOST[:PORT]; HOST is an IP address.
func parsePeer(s string) (agent.Route, error) {
	p, host, ok := strings.Cut(s, "=")
	prefix, err := netip.ParsePrefix(p)
	if !ok || err != nil {
		if a, aerr := netip.ParseAddr(p); aerr == nil && ok {
			prefix, err = netip.PrefixFrom(a, a.BitLen()), nil
		}
	}
	if !ok || err != nil {
		return agent.Route{}, fmt.Errorf("--peer %q: want PREFIX=HOST[:PORT], such as 100.64.3.0/24=192.0.2.10:1000", echo.Cut(s))
	}
	ep, err := parseListen(host)
	if err != nil {
		return agent.Route{}, fmt.Errorf("--peer %q: want PREFIX=HOST[:PORT] with HOST an IP address", echo.Cut(s))
	}
	return agent.Route{Prefix: prefix.Masked(), Endpoint: ep}, nil
}

// parseExpose reads PORT=HOST:PORT.
func parseExpose(s string) (uint16, string, error) {
	p, target, ok := strings.Cut(s, "=")
	port, err := strconv.ParseUint(p, 10, 16)
	if !ok || err != nil || port == 0 {
		return 0, "", fmt.Errorf("--expose %q: want PORT=HOST:PORT, such as 80=127.0.0.1:8080", echo.Cut(s))
	}
	if _, _, err := net.SplitHostPort(target); err != nil {
		return 0, "", fmt.Errorf("--expose %q: want PORT=HOST:PORT, such as 80=127.0.0.1:8080", echo.Cut(s))
	}
	return uint16(port), target, nil
}

func runAgent(ctx context.Context, streams IO, cfg agentConfig) error {
	for name, v := range map[string]string{"ca": cfg.CA, "cert": cfg.Cert, "key": cfg.Key} {
		if v == "" {
			return usagef("--%s is required", name)
		}
	}
	switch {
	case cfg.Netstack == (cfg.TUN != ""):
		return usagef("give one data path: --tun NAME (a kernel TUN device) or --netstack (in the process)")
	case cfg.TUN != "" && (cfg.SOCKS5 != "" || len(cfg.Expose) > 0):
		return usagef("--socks5 and --expose are for --netstack; on a TUN device programs use the overlay addresses directly")
	case cfg.MTU < 576 || cfg.MTU > 65535-100:
		return usagef("--mtu %d: want 576 to 65435", cfg.MTU)
	}
	listen, err := parseListen(cfg.Listen)
	if err != nil {
		return usageError(err)
	}
	var public []netip.AddrPort
	for _, p := range cfg.Public {
		ap, err := netip.ParseAddrPort(p)
		if err != nil || ap.Port() == 0 || ap.Port() == 65535 {
			return usagef("--public %q: want the IP:PORT of a data endpoint in front of a NAT (port 1 to 65534)", echo.Cut(p))
		}
		public = append(public, ap)
	}
	var routes []agent.Route
	for _, p := range cfg.Peers {
		r, err := parsePeer(p)
		if err != nil {
			return usageError(err)
		}
		routes = append(routes, r)
	}
	type exposed struct {
		port   uint16
		target string
	}
	var exposes []exposed
	for _, e := range cfg.Expose {
		port, target, err := parseExpose(e)
		if err != nil {
			return usageError(err)
		}
		exposes = append(exposes, exposed{port, target})
	}
	var via netip.AddrPort
	if cfg.Via != "" {
		if via, err = netip.ParseAddrPort(cfg.Via); err != nil || via.Port() == 0 {
			return usagef("--via %q: want the relay's IP:PORT", echo.Cut(cfg.Via))
		}
	}
	rb, err := parseRenewBefore(cfg.RenewBefore)
	if err != nil {
		return err
	}
	files := newDeviceFiles(cfg.CA, cfg.Cert, cfg.Key, cfg.RenewDir)
	caPath, certPath, keyPath := files.paths()
	creds, id, err := loadDevice(caPath, certPath, keyPath)
	if err != nil {
		return err
	}
	log, err := newLogger(streams.Err, logSettings{cfg.LogFormat, cfg.LogLevel})
	if err != nil {
		return err
	}
	if files.renewedAtStart {
		log.Info("starting with the renewed certificate in --renew-dir (issued after --cert, or --cert no longer verifies)", "cert", certPath)
	}
	var live *keyserver.Live // the key service connection's credentials, when there is one
	var ksConn *grpc.ClientConn
	acfg := agent.Config{Credentials: creds, Listen: listen, Public: public, Routes: routes, Via: via, SelfReport: cfg.Enclave,
		TrustUnsigned: cfg.TrustSelfReport, Lifetime: cfg.Lifetime, IdleTimeout: cfg.IdleTimeout, RekeySpread: cfg.RekeySpread,
		Logger: log, TUN: cfg.TUN, MTU: cfg.MTU}
	if cfg.Keyserver != "" {
		if id.Role != ca.RoleServer && id.Role != ca.RoleClient {
			return usagef("--keyserver is for servers (their keys) and clients (revocations): this certificate is a %s's", id.Role)
		}
		conn, l, err := dialKeyService(cfg.Keyserver, cfg.ServerName, caPath, certPath, keyPath)
		if err != nil {
			return err
		}
		live, ksConn = l, conn
		defer conn.Close()
		if acfg.KeyService, err = keyServiceClient(conn, cfg.Keyserver, cfg.ServerName, live, log); err != nil {
			return err
		}
		acfg.KeyServiceAddr = cfg.Keyserver
	} else if id.Role == ca.RoleServer {
		return usagef("a server needs --keyserver: it grants SAs under keys from the key service")
	}
	a, err := agent.New(acfg)
	if err != nil {
		if errors.Is(err, agent.ErrNoOverlay) || errors.Is(err, agent.ErrConfig) {
			return usageError(err)
		}
		return failed(err)
	}
	defer a.Close()
	ren := newRenewal(log, files, rb, ksConn, func() error { return reloadDevice(log, files, a.SetCredentials, live) })
	closeStatus, err := serveStatus(cfg.StatusSocket, "agent", func() statusReport {
		s := a.Status()
		return statusReport{Kind: "agent", Version: readBuildInfo().Version, Agent: &s, Renewal: ren.status()}
	}, log)
	if err != nil {
		return err
	}
	defer closeStatus()
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stop()
	if cfg.MetricsListen != "" {
		closeMetrics, err := serveMetrics(cfg.MetricsListen, a.Metrics().Handler(cfg.Pprof), log)
		if err != nil {
			return err
		}
		defer closeMetrics()
	}
	runErr := make(chan error, 1)
	go func() { runErr <- a.Run(ctx) }()
	select {
	case <-a.Ready():
	case err := <-runErr:
		return failed(err)
	}
	for _, e := range exposes {
		c, err := a.Expose(e.port, e.target)
		if err != nil {
			return failed(fmt.Errorf("--expose %d: %w", e.port, err))
		}
		defer c.Close()
	}
	if cfg.SOCKS5 != "" {
		sl, err := net.Listen("tcp", cfg.SOCKS5)
		if err != nil {
			return usagef("--socks5: %w", err)
		}
		defer sl.Close()
		go a.ServeSOCKS5(sl)
		log.Info("socks5 listening", "addr", sl.Addr().String())
	}
	// SIGHUP reloads the credentials (enclave cert renew, a new CA
	// bundle); ones that do not verify leave those in force.
	onHUP(ctx, func() { reloadDevice(log, files, a.SetCredentials, live) })
	go ren.run(ctx)
	log.Info("agent listening", "overlay", a.Addr().String(), "data", a.DataPort().String(), "identity", id.String(), "tun", a.TUNName())
	err = <-runErr
	logStopped(log, "agent", ctx, err)
	if err != nil {
		return failed(err)
	}
	return nil
}

// deviceSettings point at the settings every device command (agent,
// gateway) has: --config, its credentials and its key service.
type deviceSettings struct {
	config, ca, cert, key, keyserver, serverName, renewBefore, renewDir *string
}

// deviceFlags registers those flags on fl, with the help of the two that
// differ between commands.
func deviceFlags(fl *pflag.FlagSet, s deviceSettings, certHelp, keyserverHelp string) {
	fl.StringVar(s.config, "config", "", "YAML file with these settings")
	fl.StringVar(s.ca, "ca", "", "the org CA certificate")
	fl.StringVar(s.cert, "cert", "", certHelp)
	fl.StringVar(s.key, "key", "", "this device's private key")
	fl.StringVar(s.keyserver, "keyserver", "", keyserverHelp)
	fl.StringVar(s.serverName, "server-name", "", "the name in the key server's certificate (default: the host of --keyserver)")
	fl.StringVar(s.renewBefore, "renew-before", "auto", "with --keyserver: renew the certificate with the key service this long before it expires (auto: when a third of its life is left; off)")
	fl.StringVar(s.renewDir, "renew-dir", "", "write renewed certificates and keys here, and start from the newest (default: in place of --cert and --key)")
}

// loadDevice reads a device's CA, certificate and key, checks the
// certificate against the CA now, and makes its handshake credentials.
func loadDevice(caPath, certPath, keyPath string) (*handshake.Credentials, ca.Identity, error) {
	roots, err := ca.LoadRoots(caPath)
	if err != nil {
		return nil, ca.Identity{}, fileError(fmt.Errorf("--ca: %w", err))
	}
	chain, err := ca.LoadChain(certPath) // the device's certificate, then its issuing CA's, if any
	if err != nil {
		return nil, ca.Identity{}, fileError(fmt.Errorf("--cert: %w", err))
	}
	cert := chain[0]
	key, err := ca.LoadKey(keyPath)
	if err != nil {
		return nil, ca.Identity{}, fileError(fmt.Errorf("--key: %w", err))
	}
	id, err := roots.VerifyChain(chain, time.Now())
	if err != nil {
		return nil, ca.Identity{}, failed(fmt.Errorf("--cert is not a valid certificate of this CA: %w", err))
	}
	creds, err := handshake.NewCredentials(roots, cert, key, chain[1:]...)
	if err != nil {
		return nil, ca.Identity{}, usagef("--cert/--key: %w", err)
	}
	return creds, id, nil
}

// keyServiceClient is the key service's client over conn, whose
// generation watch takes the watch transport (two goroutines on the key
// server, not gRPC's four: issue 36).
func keyServiceClient(conn *grpc.ClientConn, addr, serverName string, live *keyserver.Live, log *slog.Logger) (api.KeyServiceClient, error) {
	return keyserver.WithWatchTransport(api.NewKeyServiceClient(conn), addr, serverName, live, log)
}

// dialKeyService connects to the key service over mTLS as the device;
// calls wait for it to come up, and a lost connection is tried again
// within a few seconds (gRPC's own backoff would grow to two minutes).
func dialKeyService(addr, serverName, caPath, certPath, keyPath string) (*grpc.ClientConn, *keyserver.Live, error) {
	tlsCreds, err := keyserver.LoadCredentials(caPath, certPath, keyPath)
	if err != nil {
		return nil, nil, fileError(err)
	}
	live := keyserver.NewLive(tlsCreds)
	conn, err := keyserver.DialLive(addr, serverName, live, grpc.WithDefaultCallOptions(grpc.WaitForReady(true)), keyserver.Reconnect)
	if err != nil {
		return nil, nil, usagef("--keyserver: %w", err)
	}
	return conn, live, nil
}

// onHUP runs f at each SIGHUP until ctx ends.
func onHUP(ctx context.Context, f func()) {
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	go func() {
		defer signal.Stop(hup)
		for {
			select {
			case <-ctx.Done():
				return
			case <-hup:
				f()
			}
		}
	}()
}

// reloadDevice reads a device's CA bundle, certificate and key again and
// puts them in force with set (its handshakes) and live (its key service
// connection, when it has one); anything that does not load or verify
// leaves the credentials in force, and is logged.
func reloadDevice(log *slog.Logger, files *deviceFiles, set func(*handshake.Credentials) error, live *keyserver.Live) error {
	files.choose() // --cert renewed by hand since, or a newer renewed pair
	caPath, certPath, keyPath := files.paths()
	creds, id, err := loadDevice(caPath, certPath, keyPath)
	if err == nil {
		err = set(creds)
	}
	var tlsCreds *keyserver.Credentials
	if err == nil && live != nil {
		tlsCreds, err = keyserver.LoadCredentials(caPath, certPath, keyPath)
	}
	if err != nil {
		log.ErrorContext(operatorAsked(context.Background()), "credentials not reloaded: the ones in force stay", "err", err)
		return err
	}
	if live != nil {
		live.Set(tlsCreds)
	}
	log.Info("credentials reloaded", "identity", id.String(), "fingerprint", ca.Fingerprint(creds.Cert),
		"expires", creds.Cert.NotAfter.UTC().Format(time.RFC3339), "cas", len(creds.Roots.Certs()))
	return nil
}

// serveMetrics serves h (/metrics, /healthz) on addr until the returned
// function is called.
func serveMetrics(addr string, h http.Handler, log *slog.Logger) (func(), error) {
	ml, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, usagef("--metrics-listen: %w", err)
	}
	hs := &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second}
	go hs.Serve(ml)
	log.Info("metrics listening", "addr", ml.Addr().String())
	return func() { hs.Close() }, nil
}
