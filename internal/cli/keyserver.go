package cli

import (
	"context"
	"crypto/ed25519"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/enclavekeys/enclave/internal/audit"
	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/echo"
	"github.com/enclavekeys/enclave/internal/keyclient"
	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/keyserver"
	"github.com/enclavekeys/enclave/internal/registry"
	"github.com/enclavekeys/enclave/internal/store"
)

// The shortest schedule the key server accepts: every rotation makes every
// holder of the pair fetch a key and re-establish its SAs, so a few seconds
// between rotations would be a storm, not a schedule. Event rotations are
// not bound by it; they are bound by the grace period.
const (
	MinRotationInterval = time.Minute
	MinGrace            = 5 * time.Second
)

// keyserverConfig holds the keyserver settings; the YAML names are the
// flag names, and flags given on the command line win over the file.
type keyserverConfig struct {
	Listen           string         `yaml:"listen"`
	MetricsListen    string         `yaml:"metrics-listen"`
	Pprof            bool           `yaml:"pprof"`
	CA               string         `yaml:"ca"`
	Cert             string         `yaml:"cert"`
	Key              string         `yaml:"key"`
	Store            string         `yaml:"store"`
	Etcd             string         `yaml:"etcd"`
	KEKFile          string         `yaml:"kek-file"`
	Audit            string         `yaml:"audit"`
	OrgKeyFile       string         `yaml:"org-key-file"`
	Tier             string         `yaml:"tier"`
	Enclave          keys.EnclaveID `yaml:"enclave"`
	Upstream         string         `yaml:"upstream"`
	EnclaveKeyFile   string         `yaml:"enclave-key-file"`
	Peers            []string       `yaml:"peer"`
	RotationInterval time.Duration  `yaml:"rotation-interval"`
	Grace            time.Duration  `yaml:"grace"`
	NewOrgKey        bool           `yaml:"new-org-key"`
	NewEnclaveKey    bool           `yaml:"new-enclave-key"`
	Restored         bool           `yaml:"restored"`
	LogFormat        string         `yaml:"log-format"`
	LogLevel         string         `yaml:"log-level"`
	RenewBefore      string         `yaml:"renew-before"`
	RenewDir         string         `yaml:"renew-dir"`
	IssuerCert       string         `yaml:"issuer-cert"`
	IssuerKey        string         `yaml:"issuer-key"`
	IssueDays        int            `yaml:"issue-days"`
	MaxWatchers      int            `yaml:"max-watchers"`
	MaxWatchersPer   int            `yaml:"max-watchers-per-device"`
	MaxConns         int            `yaml:"max-connections"`
	MaxConnsPer      int            `yaml:"max-connections-per-device"`
	EnclaveLayout    string         `yaml:"enclave-layout"`
	// enclaveText is --enclave as typed, read under the org's layout once
	// the store says it (3 is 3.0 under 8.8).
	enclaveText string
}

func newKeyserverCmd(streams IO) *cobra.Command {
	var cfg keyserverConfig
	var configFile string
	var enclave enclaveFlag
	cmd := &cobra.Command{
		Use:   "keyserver --ca CA.crt --cert C --key K (--store FILE --audit FILE | --etcd URL[,URL]) [--kek-file F] [flags]",
		Short: "Run the key service (gRPC over mutual TLS)",
		Long: `Run the Enclave key service: gRPC over TLS 1.3 with client certificates from
the org CA required, the registry consulted on every call, every decision in
the hash-chained audit log, rotations on a schedule and on events.

The org key is generated on the first start of a new organisation (or
imported from --org-key-file) and kept in the store sealed under the
key-encryption key (KEK), read from --kek-file (mode 0600, 64 hex digits) or
the ENCLAVE_KEK environment variable and never written to the store. Every
tier needs the KEK: the registry and the audit log's anchor are kept under
its MAC, and a store changed behind the key service's back stops the start.
A store that shows an organisation (a registry, an audit log) but has lost
its org key refuses to start; --new-org-key creates a new one on purpose.

Storage: --store FILE (bbolt, one machine) with --audit FILE, or --etcd
URL[,URL]: registry, sealed keys and audit log in etcd, so that any number of
replicas serve one organisation.

Tiers: --tier both (default) serves every device; --tier org serves pair
keys (gateways, monitors, enclave tiers) and leaves servers to their
enclave's tier; --tier enclave --enclave I --upstream ADDR serves enclave
I's servers without holding the org key: it fetches EK(I,·) from the org
tier over mTLS with its own keyserver certificate and derives server keys
itself (it needs --etcd for the shared registry, and the org's KEK).

Enclave-key mode (no org key anywhere): --tier enclave --enclave I --peer
J=ADDR ... [--enclave-key-file F]. The key server holds its enclave key E_i
(random, or imported, sealed under the KEK) and agrees on EK(I,J,g) with
enclave J's key server by a signed ML-KEM-768+X25519 exchange, once per
generation; the lower enclave id starts it. Admin changes are taken here.
--config FILE reads the same settings from YAML (keys are the flag names);
flags given on the command line win. Prometheus metrics, /healthz and
/readyz are served on --metrics-listen.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg.Enclave, cfg.enclaveText = enclave.id, enclave.raw
			if enclave.given() && cfg.EnclaveLayout != "" { // --enclave 3 is 3.0 under 8.8
				l, err := keys.ParseLayout(cfg.EnclaveLayout)
				if err != nil {
					return usagef("--enclave-layout: %v", err)
				}
				if cfg.Enclave, err = enclave.in(l); err != nil {
					return usagef("--enclave: %v", err)
				}
			}
			if configFile != "" {
				if err := mergeConfigFile(configFile, &cfg, cmd.Flags()); err != nil {
					return err
				}
			}
			return runKeyserver(cmd.Context(), streams, cfg)
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&configFile, "config", "", "YAML file with these settings")
	fl.StringVar(&cfg.Listen, "listen", "127.0.0.1:7443", "gRPC address")
	fl.StringVar(&cfg.MetricsListen, "metrics-listen", "127.0.0.1:7444", "address for /metrics, /healthz, /readyz (empty: off)")
	fl.BoolVar(&cfg.Pprof, "pprof", false, "also serve Go's /debug/pprof profiles on --metrics-listen (keep it on a local address)")
	logFlags(fl, &cfg.LogFormat, &cfg.LogLevel)
	fl.StringVar(&cfg.IssuerCert, "issuer-cert", "", "an issuing CA's certificate (enclave ca issuer): hosts joining with a token get certificates from it")
	fl.StringVar(&cfg.IssuerKey, "issuer-key", "", "the issuing CA's private key")
	fl.IntVar(&cfg.IssueDays, "issue-days", keyserver.DefaultIssueDays, "validity in days of the certificates issued to joining hosts")
	fl.IntVar(&cfg.MaxWatchers, "max-watchers", keyserver.DefaultMaxWatchers, "watch streams this key server serves at most (one per agent and gateway); past it a stream is refused and its device retries later")
	fl.IntVar(&cfg.MaxWatchersPer, "max-watchers-per-device", keyserver.DefaultMaxWatchersPerDevice, "watch streams one device may hold open at once")
	fl.IntVar(&cfg.MaxConns, "max-connections", keyserver.DefaultMaxConnections, "connections this key server holds at most; one past it is closed at once (its device retries)")
	fl.IntVar(&cfg.MaxConnsPer, "max-connections-per-device", keyserver.DefaultMaxConnectionsPerDevice, "connections one device (by its certificate) may hold at once")
	fl.StringVar(&cfg.RenewBefore, "renew-before", "auto", "with an issuing CA: renew this key server's certificate with it this long before it expires (auto: when a third of its life is left; off)")
	fl.StringVar(&cfg.RenewDir, "renew-dir", "", "write renewed certificates and keys here, and start from the newest (default: in place of --cert and --key)")
	fl.StringVar(&cfg.CA, "ca", "", "the org CA certificate")
	fl.StringVar(&cfg.Cert, "cert", "", "this key server's certificate (role keyserver)")
	fl.StringVar(&cfg.Key, "key", "", "this key server's private key")
	fl.StringVar(&cfg.Store, "store", "", "the embedded store file (bbolt)")
	fl.StringVar(&cfg.Etcd, "etcd", "", "etcd endpoints URL[,URL] instead of --store: registry, sealed keys and audit log in etcd, for several replicas")
	fl.StringVar(&cfg.KEKFile, "kek-file", "", "the key-encryption key file (else $ENCLAVE_KEK)")
	fl.StringVar(&cfg.Audit, "audit", "", "the audit log file")
	fl.StringVar(&cfg.OrgKeyFile, "org-key-file", "", "import this org key (64 hex digits) into a new store, instead of a random one")
	fl.StringVar(&cfg.EnclaveLayout, "enclave-layout", "", "sub-enclave levels of a new organisation, as bit widths of the 16-bit enclave id (8.8: enclaves 1-255, each with sub-enclaves N.1-N.255); a store keeps the layout it was made with: a start naming another is refused, one without this flag uses the store's (a new store without it: 16, one level)")
	fl.StringVar(&cfg.Tier, "tier", "both", "org (pair keys), enclave (one enclave's servers, no org key) or both")
	fl.Var(&enclave, "enclave", "the enclave an enclave tier serves")
	fl.StringVar(&cfg.Upstream, "upstream", "", "the org tier's address, for an enclave tier under an org key")
	fl.StringVar(&cfg.EnclaveKeyFile, "enclave-key-file", "", "enclave-key mode: import this enclave key E_i (64 hex digits) instead of a random one")
	fl.StringSliceVar(&cfg.Peers, "peer", nil, "enclave-key mode: J=HOST:PORT of enclave J's key server (repeat for each)")
	fl.DurationVar(&cfg.RotationInterval, "rotation-interval", 24*time.Hour, "scheduled rotation period")
	fl.DurationVar(&cfg.Grace, "grace", time.Hour, "how long a previous generation stays accepted (and the least time between rotations)")
	fl.BoolVar(&cfg.NewOrgKey, "new-org-key", false, "create a new org key although the store shows an existing organisation whose key is missing (every pair key changes)")
	fl.BoolVar(&cfg.NewEnclaveKey, "new-enclave-key", false, "enclave-key mode: create a new enclave key although the store shows an existing organisation whose key is missing")
	fl.BoolVar(&cfg.Restored, "restored", false, "serve a store that is behind its audit log (restored from a backup on purpose): the changes after its last are gone; SPI counters are raised from the log either way")
	return cmd
}

func runKeyserver(ctx context.Context, streams IO, cfg keyserverConfig) (retErr error) {
	for name, v := range map[string]string{"ca": cfg.CA, "cert": cfg.Cert, "key": cfg.Key} {
		if v == "" {
			return usagef("--%s is required", name)
		}
	}
	switch {
	case (cfg.Store == "") == (cfg.Etcd == ""):
		return usagef("give exactly one of --store FILE and --etcd URL[,URL]")
	case cfg.Store != "" && cfg.Audit == "":
		return usagef("--audit FILE is required with --store")
	case cfg.Etcd != "" && cfg.Audit != "":
		return usagef("with --etcd the audit log lives in etcd; drop --audit")
	case cfg.Pprof && cfg.MetricsListen == "":
		return usagef("--pprof serves on --metrics-listen, which is off")
	}
	for _, b := range []struct {
		flag string
		v    int
	}{{"max-watchers", cfg.MaxWatchers}, {"max-watchers-per-device", cfg.MaxWatchersPer}, {"max-connections", cfg.MaxConns}, {"max-connections-per-device", cfg.MaxConnsPer}} {
		if b.v < 1 {
			return usagef("--%s %d: want 1 or more", b.flag, b.v)
		}
	}
	if cfg.MaxConns < cfg.MaxWatchers {
		return usagef("--max-connections %d is below --max-watchers %d: each watch stream holds a connection (and its agent a gRPC one for a while after each call: give it about twice --max-watchers)", cfg.MaxConns, cfg.MaxWatchers)
	}
	tier, err := keyserver.ParseTier(cfg.Tier)
	if err != nil {
		return usageError(err)
	}
	var layout keys.Layout
	if cfg.EnclaveLayout != "" {
		if layout, err = keys.ParseLayout(cfg.EnclaveLayout); err != nil {
			return usagef("--enclave-layout: %v", err)
		}
	}
	var enclaveID keys.EnclaveID
	peers := map[keys.EnclaveID]string{}
	if tier == keyserver.TierEnclave {
		if cfg.Etcd == "" || (cfg.Enclave == 0 && cfg.enclaveText == "") {
			return usagef("--tier enclave needs --etcd (the shared registry) and --enclave")
		}
		if (cfg.Upstream == "") == (len(cfg.Peers) == 0 && cfg.EnclaveKeyFile == "") {
			return usagef("--tier enclave takes either --upstream (pair keys from the org tier) or --peer/--enclave-key-file (enclave-key mode)")
		}
		if cfg.OrgKeyFile != "" {
			return usagef("an enclave tier holds no org key; drop --org-key-file")
		}
		enclaveID = cfg.Enclave
		if _, err := enclavePeers(cfg.Peers, keys.Layout{}, enclaveID, true); err != nil {
			return err
		}
	} else if cfg.Enclave != 0 || cfg.Upstream != "" || len(cfg.Peers) > 0 || cfg.EnclaveKeyFile != "" {
		return usagef("--enclave, --upstream, --peer and --enclave-key-file are for --tier enclave")
	}
	rot := registry.Rotation{Interval: cfg.RotationInterval, Grace: cfg.Grace}
	if rot.Interval < MinRotationInterval {
		return usagef("--rotation-interval %s: want at least %s, such as 24h", rot.Interval, MinRotationInterval)
	}
	if rot.Grace < MinGrace || rot.Grace > rot.Interval {
		return usagef("--grace %s: want at least %s and no longer than the rotation interval (%s)", rot.Grace, MinGrace, rot.Interval)
	}
	log, err := newLogger(streams.Err, logSettings{cfg.LogFormat, cfg.LogLevel})
	if err != nil {
		return err
	}
	rb, err := parseRenewBefore(cfg.RenewBefore)
	if err != nil {
		return err
	}
	files := newDeviceFiles(cfg.CA, cfg.Cert, cfg.Key, cfg.RenewDir)
	caPath, certPath, keyPath := files.paths()
	if files.renewedAtStart {
		log.Info("starting with the renewed certificate in --renew-dir (issued after --cert, or --cert no longer verifies)", "cert", certPath)
	}
	creds, err := keyserver.LoadCredentials(caPath, certPath, keyPath)
	if err != nil {
		return fileError(err)
	}
	if id, err := creds.Identity(time.Now()); err != nil {
		return failed(fmt.Errorf("--cert is not a valid certificate of this CA: %w", err))
	} else if id.Role != ca.RoleKeyserver {
		return usagef("--cert is a %s's certificate (%s): the key service needs a keyserver certificate (enclave cert issue --role keyserver --host NAMES)", id.Role, id.Name)
	}
	issuer, err := loadIssuer(cfg, creds.Roots)
	if err != nil {
		return err
	}
	live := keyserver.NewLive(creds)
	kek, err := store.LoadKEK(cfg.KEKFile)
	if err != nil {
		return usageError(err)
	}
	// Listen before touching the disk, so that a start that cannot serve
	// leaves no new store behind.
	lis, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return usagef("--listen: %w", err)
	}
	defer lis.Close()
	var mlis net.Listener
	if cfg.MetricsListen != "" {
		if mlis, err = net.Listen("tcp", cfg.MetricsListen); err != nil {
			return usagef("--metrics-listen: %w", err)
		}
		defer mlis.Close()
	}
	var st store.Store
	var al audit.Sink
	var bolt *store.Bolt
	var history *keyserver.History // the file log's, read as it opens (bbolt)
	if cfg.Etcd != "" {
		es, err := store.OpenEtcd(strings.Split(cfg.Etcd, ","), "", kek)
		if err != nil {
			return failed(err)
		}
		st, al = es, store.NewEtcdAudit(es, nil)
	} else {
		fresh := !exists(cfg.Store)
		bs, err := store.OpenBolt(cfg.Store, kek)
		if err != nil {
			return failed(err)
		}
		st, bolt = bs, bs
		if fresh {
			// A store this start created goes again if the start fails.
			defer func() {
				if retErr != nil {
					os.Remove(cfg.Store)
				}
			}()
		}
	}
	defer st.Close()
	if tier == keyserver.TierEnclave {
		// The enclave and its peers are read under the org's layout: the
		// flag's, else the one the store was made with.
		lay := layout
		if cfg.EnclaveLayout == "" {
			if reg, err := st.View(ctx); err == nil {
				lay = reg.Layout()
			}
		}
		if cfg.enclaveText != "" {
			if enclaveID, err = lay.ParseID(cfg.enclaveText); err != nil {
				return usagef("--enclave: %v", err)
			}
		}
		if lay.TopEnclave(enclaveID) != enclaveID {
			return usagef("--enclave %s: an enclave tier serves a level-1 enclave (its sub-enclaves with it), not a sub-enclave", lay.Short(enclaveID))
		}
		if peers, err = enclavePeers(cfg.Peers, lay, enclaveID, false); err != nil {
			return err
		}
	}
	evidence, err := store.Evidence(ctx, st)
	if err != nil {
		return failed(err)
	}
	if evidence == "" && cfg.Audit != "" && !emptyFile(cfg.Audit) {
		evidence = "its audit log " + cfg.Audit + " is not empty"
	}
	var orgKey keys.Key
	var source keyserver.PairKeySource
	switch {
	case tier == keyserver.TierEnclave && cfg.Upstream != "":
		conn, err := keyserver.DialLive(cfg.Upstream, "", live)
		if err != nil {
			return usagef("--upstream: %w", err)
		}
		defer conn.Close()
		source = keyserver.NewUpstream(conn, nil)
	case tier == keyserver.TierEnclave: // enclave-key mode
		offered, err := offeredKey("--enclave-key-file", cfg.EnclaveKeyFile)
		if err != nil {
			return err
		}
		ei, err := store.SealedKey(ctx, st, kek, store.EnclaveKeyName(enclaveID), offered, evidence == "" || cfg.NewEnclaveKey)
		if err != nil {
			return failed(missingKey(err, evidence, "--new-enclave-key"))
		}
		x, err := keyserver.NewExchangeSource(keyserver.ExchangeConfig{Enclave: enclaveID, EnclaveKey: ei, Creds: creds, Peers: peers, Store: st, KEK: kek, Log: log})
		ei.Zero()
		if err != nil {
			return failed(err)
		}
		source = x
	default:
		offered, err := offeredKey("--org-key-file", cfg.OrgKeyFile)
		if err != nil {
			return err
		}
		if orgKey, err = store.OrgKey(ctx, st, kek, offered, evidence == "" || cfg.NewOrgKey); err != nil {
			return failed(missingKey(err, evidence, "--new-org-key"))
		}
	}
	if al == nil {
		if !exists(cfg.Audit) {
			defer func() {
				if retErr != nil {
					os.Remove(cfg.Audit)
				}
			}()
		}
		// The log's history is read as it is verified, in one pass:
		// Reconcile needs it below.
		history = keyserver.NewHistory()
		fl, err := audit.OpenEach(cfg.Audit, nil, bolt, cfg.Restored, history.Add)
		if err != nil {
			return failed(err)
		}
		if n := fl.TornBytes(); n > 0 {
			// Say it where it happened: a crash cut the last write short.
			reason := fmt.Sprintf("dropped a torn final line of %d bytes (a write cut short, never acknowledged)", n)
			log.Warn("audit log recovered", "reason", reason)
			if err := fl.Append(audit.Entry{Caller: "keyserver", Role: string(ca.RoleKeyserver), RPC: "start", Decision: audit.Allow, Reason: reason}); err != nil {
				fl.Close()
				return failed(err)
			}
		}
		al = fl
	}
	defer al.Close()
	metrics := keyserver.NewMetrics()
	if cfg.Pprof {
		metrics.Profiling()
	}
	var nofile syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &nofile); err == nil && nofile.Cur < uint64(cfg.MaxConns)+1024 {
		// Past it, accepting pauses (and is logged) until connections end.
		log.Warn("the open-files limit is below --max-connections and the key server's own files: raise it (LimitNOFILE in the unit, ulimit -n) or lower --max-connections",
			"limit", nofile.Cur, "max_connections", cfg.MaxConns)
	}
	conns := keyserver.NewConnGuard(cfg.MaxConns, cfg.MaxConnsPer, metrics, log)
	lis = conns.Listener(lis)
	svc, err := keyserver.New(keyserver.Config{Store: st, OrgKey: orgKey, Roots: creds.Roots, Audit: al, Rotation: rot, Logger: log, Metrics: metrics,
		Tier: tier, Enclave: enclaveID, PairKeys: source, Issuer: issuer, IssueDays: cfg.IssueDays,
		MaxWatchers: cfg.MaxWatchers, MaxWatchersPerDevice: cfg.MaxWatchersPer, Conns: conns})
	orgKey.Zero()
	if err != nil {
		return failed(err)
	}
	defer svc.Close()
	if bolt != nil {
		// The audit log, verified above, is the anchor outside the store:
		// a store behind it is refused (or, --restored, audited), and its
		// SPI counters never lag the ranges the log shows leased.
		if err := svc.ReconcileWith(ctx, history, cfg.Restored); err != nil {
			return failed(err)
		}
	}
	if cfg.EnclaveLayout != "" {
		if err := svc.SetLayout(ctx, layout); err != nil {
			return failed(err)
		}
	}
	if reg, err := st.View(ctx); err == nil && reg.EnclaveLayout != "" {
		log.Info("enclave layout", "layout", reg.EnclaveLayout)
	}
	gs := keyserver.NewServerLive(svc, live, metrics.Interceptors()...)
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stop()
	// SIGHUP reloads the CA bundle, certificate and key (enclave cert
	// renew, a CA rollover): new connections use them; ones that do not
	// verify leave those in force.
	issuerNow := issuer
	reload := func() error {
		files.choose() // --cert renewed by hand since, or a newer renewed pair
		caPath, certPath, keyPath := files.paths()
		c, err := keyserver.LoadCredentials(caPath, certPath, keyPath)
		if err == nil {
			var id ca.Identity
			if id, err = c.Identity(time.Now()); err == nil && id.Role != ca.RoleKeyserver {
				err = fmt.Errorf("--cert is a %s's certificate, not a key server's", id.Role)
			} else if err != nil {
				err = fmt.Errorf("this key server's own certificate %s does not verify under the CA bundle %s: %w (in a CA rollover, renew it with the new CA before the old one leaves the bundle: enclave cert renew --ca NEWCA --cert %s)", certPath, caPath, err, certPath)
			}
		}
		if err == nil && c.Roots.Org() != creds.Roots.Org() {
			err = fmt.Errorf("the CA bundle is of org %s, the store's of %s", c.Roots.Org(), creds.Roots.Org())
		}
		if err != nil {
			log.ErrorContext(operatorAsked(context.Background()), "credentials not reloaded: the ones in force stay", "err", err)
			return err
		}
		// The issuing CA too (a rollover gives the key server a new one).
		// One that does not load leaves the one in force; one that does
		// not chain to the new bundle is taken, and joins are refused
		// until it does: neither holds back the rest of the reload.
		is := issuerNow
		issuerKept := false
		if cfg.IssuerCert != "" {
			if loaded, ierr := ca.LoadIssuer(cfg.IssuerCert, cfg.IssuerKey); ierr != nil {
				issuerKept = true
				log.ErrorContext(operatorAsked(context.Background()), "issuing CA not reloaded: the one in force stays", "err", ierr,
					"what to do", "under systemd the issuer's key is a copy made at start: restart the key server to take a new one")
			} else {
				is = loaded
			}
		}
		if is != nil {
			if _, verr := is.Cert.Verify(x509.VerifyOptions{Roots: c.Roots.Pool(), CurrentTime: time.Now(), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); verr != nil {
				log.ErrorContext(operatorAsked(context.Background()), "the issuing CA does not chain to the new CA bundle: joins are refused until it does", "err", verr,
					"what to do", "make an issuer of the current CA (enclave ca issuer --ca CA --name NAME --out DIR), put it at --issuer-cert/--issuer-key, and send SIGHUP")
			}
		}
		if err := svc.SetTrust(c.Roots, is); err != nil {
			log.ErrorContext(operatorAsked(context.Background()), "credentials not reloaded: the ones in force stay", "err", err)
			return err
		}
		issuerNow = is
		live.Set(c)
		args := []any{"fingerprint", ca.Fingerprint(c.Cert.Leaf), "expires", c.Cert.Leaf.NotAfter.UTC().Format(time.RFC3339), "cas", len(c.Roots.Certs())}
		if is != nil {
			args = append(args, "issuer", ca.Fingerprint(is.Cert), "issuer_expires", is.Cert.NotAfter.UTC().Format(time.RFC3339))
		}
		if issuerKept {
			log.Warn("credentials reloaded, but not the issuing CA (see the error above)", args...)
		} else {
			log.Info("credentials reloaded", args...)
		}
		return nil
	}
	onHUP(ctx, func() { reload() })
	// The key server renews its own certificate with its issuing CA, as
	// devices do with it (issue 32), into --renew-dir.
	ren := newRenewal(log, files, rb, nil, reload)
	if !rb.off && issuer != nil {
		ren.st.State = "waiting"
		ren.obtain = func(ctx context.Context, roots *ca.Roots, id ca.Identity) (*keyclient.Renewed, error) {
			return renewKeyserver(ctx, svc, roots, id, files)
		}
	} else if issuer == nil {
		ren.st.State = "off (no issuing CA)"
	}
	go ren.run(ctx)
	errc := make(chan error, 2)
	runDone := make(chan error, 1)
	go func() { errc <- gs.Serve(lis) }()
	go func() { runDone <- svc.Run(ctx) }()
	var hs *http.Server
	if mlis != nil {
		hs = &http.Server{Handler: metrics.Handler(svc.Ready), ReadHeaderTimeout: 5 * time.Second}
		go func() { errc <- hs.Serve(mlis) }()
		log.Info("metrics listening", "addr", mlis.Addr().String())
	}
	log.Info("key service listening", "addr", lis.Addr().String(), "store", cfg.Store, "etcd", cfg.Etcd, "audit", cfg.Audit,
		"tier", string(tier), "rotation_interval", rot.Interval.String(), "grace", rot.Grace.String())
	select {
	case <-ctx.Done():
		logStopped(log, "key service", ctx, nil)
	case err := <-errc:
		logStopped(log, "key service", ctx, err)
		gs.Stop()
		stop()
		<-runDone
		return failed(err)
	case err := <-runDone:
		logStopped(log, "key service", ctx, err)
		gs.Stop()
		return failed(err)
	}
	if hs != nil {
		hs.Close()
	}
	// The watch streams end with ctx; calls in flight get a moment: a
	// stop within a second (issue 32).
	done := make(chan struct{})
	go func() { gs.GracefulStop(); close(done) }()
	select {
	case <-done:
	case <-time.After(700 * time.Millisecond):
		gs.Stop()
	}
	<-runDone // its last audit entries are written before the log closes
	return nil
}

// missingKey explains ErrKeyMissing: what shows the organisation exists,
// and the flag that replaces the key on purpose.
func missingKey(err error, evidence, flag string) error {
	if !errors.Is(err, store.ErrKeyMissing) {
		return err
	}
	return fmt.Errorf("%w (%s): the key was lost or removed. Restore the store from a backup, or start with %s to create a new key on purpose (every pair key changes)", err, evidence, flag)
}

// exists reports whether path names an existing file.
func exists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

// emptyFile reports whether path is missing or has no bytes.
func emptyFile(path string) bool {
	st, err := os.Stat(path)
	return err != nil || st.Size() == 0
}

// offeredKey reads a key file to import, or returns nil when none is given.
func offeredKey(flag, path string) (*keys.Key, error) {
	if path == "" {
		return nil, nil
	}
	k, err := readKeyFlag(flag, "@"+path)
	if err != nil {
		return nil, usageError(err)
	}
	return &k, nil
}

// loadIssuer loads the issuing CA the configuration names (none when it
// names none) and checks it chains to roots.
func loadIssuer(cfg keyserverConfig, roots *ca.Roots) (*ca.Authority, error) {
	switch {
	case cfg.IssuerCert != "" && cfg.IssuerKey != "":
		issuer, err := ca.LoadIssuer(cfg.IssuerCert, cfg.IssuerKey)
		if err != nil {
			return nil, fileError(fmt.Errorf("--issuer-cert/--issuer-key: %w", err))
		}
		if _, err := issuer.Cert.Verify(x509.VerifyOptions{Roots: roots.Pool(), CurrentTime: time.Now(), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
			return nil, usagef("--issuer-cert is not an issuing CA of --ca: %v", err)
		}
		return issuer, nil
	case cfg.IssuerCert != "" || cfg.IssuerKey != "":
		return nil, usagef("give both --issuer-cert and --issuer-key")
	}
	return nil, nil
}

// renewKeyserver issues this key server a new certificate for its
// identity and host names from its issuing CA, for a key made here.
func renewKeyserver(ctx context.Context, svc *keyserver.Service, roots *ca.Roots, id ca.Identity, files *deviceFiles) (*keyclient.Renewed, error) {
	_, certPath, _ := files.paths()
	chain, err := ca.LoadChain(certPath)
	if err != nil {
		return nil, err
	}
	var hosts []string
	hosts = append(hosts, chain[0].DNSNames...)
	for _, ip := range chain[0].IPAddresses {
		hosts = append(hosts, ip.String())
	}
	priv, _, err := ca.NewKeyRequest()
	if err != nil {
		return nil, err
	}
	issued, err := svc.RenewOwn(ctx, id, hosts, priv.Public().(ed25519.PublicKey))
	if err != nil {
		return nil, err
	}
	got, err := roots.VerifyChain(append([]*x509.Certificate{issued.Cert}, issued.Chain...), time.Now())
	if err != nil || got != id {
		return nil, fmt.Errorf("the renewed certificate does not verify as %s: %v", id, err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(priv)
	if err != nil {
		return nil, err
	}
	defer clear(der)
	return &keyclient.Renewed{CertPEM: issued.CertPEM, KeyPEM: pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), Cert: issued.Cert, ID: got}, nil
}

// enclavePeers reads --peer J=HOST:PORT under layout l (J dotted under a
// sub-enclave layout); check only checks their form, before the layout is
// known.
func enclavePeers(list []string, l keys.Layout, self keys.EnclaveID, check bool) (map[keys.EnclaveID]string, error) {
	peers := map[keys.EnclaveID]string{}
	for _, p := range list {
		j, addr, ok := strings.Cut(p, "=")
		var f enclaveFlag
		err := f.Set(j)
		var id keys.EnclaveID
		if err == nil && !check {
			id, err = f.in(l)
		}
		if !ok || err != nil || addr == "" || (!check && id == self) {
			return nil, usagef("--peer %q: want J=HOST:PORT for another enclave J", echo.Cut(p))
		}
		peers[id] = addr
	}
	return peers, nil
}
