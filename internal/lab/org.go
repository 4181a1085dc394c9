package lab

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/enclavekeys/enclave/internal/agent"
	"github.com/enclavekeys/enclave/internal/api"
	"github.com/enclavekeys/enclave/internal/audit"
	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/gateway"
	"github.com/enclavekeys/enclave/internal/handshake"
	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/keyserver"
	"github.com/enclavekeys/enclave/internal/registry"
	"github.com/enclavekeys/enclave/internal/store"
)

// org is the lab's organisation as it runs: its CA, key servers, agents
// and gateways, all in this process, talking over loopback.
type org struct {
	dir  string
	log  *slog.Logger
	auth *ca.Authority
	// issuer is the org key server's issuing CA: hosts join through it.
	issuer *ca.Authority
	now    time.Time
	clock  *labClock // the key services'

	kek   *store.KEK
	bolt  *store.Bolt
	audit *audit.Log

	servers map[string]*keyServer // by device name
	admin   api.AdminClient

	mu       sync.Mutex
	agents   map[string]*agent.Agent
	gateways map[string]*gateway.Gateway
	stops    []func()
}

// keyServer is one running key service.
type keyServer struct {
	name  string
	addr  string
	svc   *keyserver.Service
	creds *keyserver.Credentials
	mu    sync.Mutex
	gs    *keyserver.Server // nil while down
}

// down stops answering (an outage): the listener closes and connections
// break; the service itself keeps its state.
func (ks *keyServer) down() {
	ks.mu.Lock()
	gs := ks.gs
	ks.gs = nil
	ks.mu.Unlock()
	if gs != nil {
		gs.Stop()
	}
}

// up answers again on the same address.
func (ks *keyServer) up() error {
	var lis net.Listener
	var err error
	for try := 0; try < 100; try++ {
		if lis, err = net.Listen("tcp", ks.addr); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		return err
	}
	ks.mu.Lock()
	ks.gs = keyserver.NewServer(ks.svc, ks.creds)
	gs := ks.gs
	ks.mu.Unlock()
	go gs.Serve(lis)
	return nil
}

// newOrg makes the CA in dir.
func newOrg(dir string, log *slog.Logger) (*org, error) {
	now := time.Now().UTC().Truncate(time.Second)
	auth, err := ca.Init(filepath.Join(dir, "ca"), "lab.example", now.Add(-time.Minute))
	if err != nil {
		return nil, err
	}
	is, err := auth.IssueIssuer("ks-org", 60, now.Add(-time.Minute))
	if err != nil {
		return nil, err
	}
	key, err := ca.ParseKeyPEM(is.KeyPEM)
	if err != nil {
		return nil, err
	}
	issuer, err := ca.NewIssuer(is.Cert, key)
	if err != nil {
		return nil, err
	}
	return &org{dir: dir, log: log, auth: auth, issuer: issuer, now: now, clock: newLabClock(), servers: map[string]*keyServer{},
		agents: map[string]*agent.Agent{}, gateways: map[string]*gateway.Gateway{}}, nil
}

// issue makes a device's certificate and key, and writes them to
// certs/NAME.crt and .key (for a look afterwards with --keep).
func (o *org) issue(id ca.Identity, hosts ...string) (*ca.Issued, error) {
	// Valid for a month: the key services' clock may be moved on by days.
	is, err := o.auth.Issue(id, hosts, 30, o.now.Add(-time.Minute))
	if err != nil {
		return nil, err
	}
	dir := filepath.Join(o.dir, "certs")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(dir, id.Name+".crt"), is.CertPEM, 0o644); err != nil {
		return nil, err
	}
	return is, os.WriteFile(filepath.Join(dir, id.Name+".key"), is.KeyPEM, 0o600)
}

// credentials issues a device certificate and makes its handshake
// credentials.
func (o *org) credentials(id ca.Identity) (*handshake.Credentials, error) {
	is, err := o.issue(id)
	if err != nil {
		return nil, err
	}
	key, err := ca.ParseKeyPEM(is.KeyPEM)
	if err != nil {
		return nil, err
	}
	return handshake.NewCredentials(o.auth.Roots(), is.Cert, key)
}

// tlsCreds issues a certificate and makes its mTLS credentials.
func (o *org) tlsCreds(id ca.Identity, hosts ...string) (*keyserver.Credentials, error) {
	is, err := o.issue(id, hosts...)
	if err != nil {
		return nil, err
	}
	pair, err := tls.X509KeyPair(is.CertPEM, is.KeyPEM)
	if err != nil {
		return nil, err
	}
	return &keyserver.Credentials{Roots: o.auth.Roots(), Cert: pair}, nil
}

// openStore opens the registry store all the lab's key servers share (as
// replicas share etcd) and the audit log, under a fresh KEK.
func (o *org) openStore() error {
	raw := make([]byte, 32)
	rand.Read(raw)
	kek, err := store.NewKEK(raw)
	if err != nil {
		return err
	}
	o.kek = kek
	if o.bolt, err = store.OpenBolt(filepath.Join(o.dir, "ks.db"), kek); err != nil {
		return err
	}
	o.audit, err = audit.Open(filepath.Join(o.dir, "audit.log"), nil, o.bolt)
	return err
}

// Tiers of the lab's key servers.
const (
	tierOrg      = "org"      // the org key: admin, gateways, monitor, servers of enclaves without their own tier
	tierUpstream = "upstream" // an enclave tier taking its pair keys from the org tier
	tierKeyMode  = "key-mode" // an enclave tier with its own enclave key
)

// startOrgTier opens the store, starts the org-tier key service named
// name and connects the org's administrator (alice) to it.
func (o *org) startOrgTier(ctx context.Context, name string, rot registry.Rotation) error {
	if err := o.openStore(); err != nil {
		return err
	}
	if _, err := o.startKeyServer(ctx, name, tierOrg, 0, rot); err != nil {
		return err
	}
	conn, err := o.dial(name, ca.Identity{Name: "alice", Role: ca.RoleAdmin})
	if err != nil {
		return err
	}
	o.admin = api.NewAdminClient(conn)
	return nil
}

// startKeyServer starts a key service named name: the org tier (holding
// the org key), or an enclave tier of enclave e.
func (o *org) startKeyServer(ctx context.Context, name, tier string, e keys.EnclaveID, rot registry.Rotation) (*keyServer, error) {
	id := ca.Identity{Name: name, Role: ca.RoleKeyserver, Enclave: e}
	creds, err := o.tlsCreds(id, "127.0.0.1")
	if err != nil {
		return nil, err
	}
	cfg := keyserver.Config{Store: o.bolt, Roots: o.auth.Roots(), Audit: o.audit, Rotation: rot, Clock: o.clock, Logger: o.log.With("keyserver", name)}
	switch tier {
	case tierOrg:
		cfg.Issuer = o.issuer // hosts join here (enclave join)
		if cfg.OrgKey, err = store.OrgKey(ctx, o.bolt, o.kek, nil, true); err != nil {
			return nil, err
		}
	case tierUpstream:
		conn, err := keyserver.Dial(o.servers["ks-org"].addr, "127.0.0.1", creds)
		if err != nil {
			return nil, err
		}
		o.onStop(func() { conn.Close() })
		cfg.Tier, cfg.Enclave, cfg.PairKeys = keyserver.TierEnclave, e, keyserver.NewUpstream(conn, nil)
	case tierKeyMode:
		ek, err := store.SealedKey(ctx, o.bolt, o.kek, store.EnclaveKeyName(e), nil, true)
		if err != nil {
			return nil, err
		}
		x, err := keyserver.NewExchangeSource(keyserver.ExchangeConfig{Enclave: e, EnclaveKey: ek, Creds: creds,
			Peers: map[keys.EnclaveID]string{}, Store: o.bolt, KEK: o.kek, Log: cfg.Logger})
		ek.Zero()
		if err != nil {
			return nil, err
		}
		cfg.Tier, cfg.Enclave, cfg.PairKeys = keyserver.TierEnclave, e, x
	default:
		return nil, fmt.Errorf("lab: tier %q", tier)
	}
	svc, err := keyserver.New(cfg)
	cfg.OrgKey.Zero()
	if err != nil {
		return nil, err
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	ks := &keyServer{name: name, addr: lis.Addr().String(), svc: svc, creds: creds, gs: keyserver.NewServer(svc, creds)}
	runCtx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go ks.gs.Serve(lis)
	go func() { svc.Run(runCtx); close(done) }()
	o.onStop(func() {
		cancel()
		ks.down()
		<-done
		svc.Close()
	})
	o.servers[name] = ks
	return ks, nil
}

// onStop queues f for the lab's end (run in reverse order).
func (o *org) onStop(f func()) {
	o.mu.Lock()
	o.stops = append(o.stops, f)
	o.mu.Unlock()
}

// stop ends everything the lab started, newest first.
func (o *org) stop() {
	o.mu.Lock()
	stops := o.stops
	o.stops = nil
	o.mu.Unlock()
	for i := len(stops) - 1; i >= 0; i-- {
		stops[i]()
	}
	o.clock.stop()
	if o.audit != nil {
		o.audit.Close()
	}
	if o.bolt != nil {
		o.bolt.Close()
	}
}

// dial connects to the named key server as device id.
func (o *org) dial(server string, id ca.Identity) (*grpc.ClientConn, error) {
	creds, err := o.tlsCreds(id)
	if err != nil {
		return nil, err
	}
	conn, err := keyserver.Dial(o.servers[server].addr, "127.0.0.1", creds, grpc.WithDefaultCallOptions(grpc.WaitForReady(true)), keyserver.Reconnect)
	if err != nil {
		return nil, err
	}
	o.onStop(func() { conn.Close() })
	return conn, nil
}

// startAgent starts an agent for id on loopback: a server gets its keys
// from the named key server; routes and via make it a client.
func (o *org) startAgent(id ca.Identity, keyServer string, routes []agent.Route, via netip.AddrPort) (*agent.Agent, error) {
	creds, err := o.credentials(id)
	if err != nil {
		return nil, err
	}
	a, _, err := o.startAgentAt(id, creds, keyServer, routes, via, netip.AddrPort{})
	return a, err
}

// startAgentAt starts an agent with creds listening on listen (a free
// port pair when it is not valid), and returns a function that stops it
// (the org's end stops it too): a restart is a stop and a new agent on the
// same address.
func (o *org) startAgentAt(id ca.Identity, creds *handshake.Credentials, keyServer string, routes []agent.Route, via, listen netip.AddrPort) (*agent.Agent, func(), error) {
	var err error
	cfg := agent.Config{Credentials: creds, Routes: routes, Via: via, Logger: o.log.With("device", id.Name), Guard: handshake.GuardConfig{}}
	if keyServer != "" {
		conn, err := o.dial(keyServer, id)
		if err != nil {
			return nil, nil, err
		}
		cfg.KeyService, cfg.KeyServiceAddr = api.NewKeyServiceClient(conn), o.servers[keyServer].addr
	}
	var a *agent.Agent
	for try := 0; ; try++ { // the control port (data + 1) may be taken
		cfg.Listen = listen
		if !listen.IsValid() {
			cfg.Listen = netip.MustParseAddrPort("127.0.0.1:0")
		} else if try > 0 {
			time.Sleep(20 * time.Millisecond) // the address of an agent just stopped
		}
		if a, err = agent.New(cfg); err == nil {
			break
		}
		if try > 50 {
			return nil, nil, err
		}
	}
	stop, err := o.run("agent "+id.Name, a.Run, a.Ready())
	if err != nil {
		return nil, nil, err
	}
	o.mu.Lock()
	o.agents[id.Name] = a
	o.mu.Unlock()
	return a, stop, nil
}

// run runs a component (an agent or a gateway) until the org stops, and
// waits until it is ready; what ends it before that is the error. It
// returns a function that stops it sooner.
func (o *org) run(what string, run func(context.Context) error, ready <-chan struct{}) (func(), error) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- run(ctx) }()
	select {
	case <-ready:
	case err := <-done:
		cancel()
		return nil, fmt.Errorf("lab: %s: %w", what, err)
	}
	var once sync.Once
	stop := func() { once.Do(func() { cancel(); <-done }) }
	o.onStop(stop)
	return stop, nil
}

// startGateway starts a relay gateway (or monitor) for id.
func (o *org) startGateway(id ca.Identity, noDerive bool, flowLog string) (*gateway.Gateway, error) {
	creds, err := o.credentials(id)
	if err != nil {
		return nil, err
	}
	g, _, err := o.startGatewayAt(id, creds, noDerive, flowLog, netip.AddrPort{})
	return g, err
}

// startGatewayAt starts a relay gateway with creds on relay (a free port
// pair when it is not valid) and returns a function that stops it.
func (o *org) startGatewayAt(id ca.Identity, creds *handshake.Credentials, noDerive bool, flowLog string, relay netip.AddrPort) (*gateway.Gateway, func(), error) {
	conn, err := o.dial("ks-org", id)
	if err != nil {
		return nil, nil, err
	}
	cfg := gateway.Config{Credentials: creds, KeyService: api.NewKeyServiceClient(conn), KeyServiceAddr: o.servers["ks-org"].addr, NoDerive: noDerive,
		Relay: netip.MustParseAddrPort("127.0.0.1:0"), RelayTo: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")},
		FlowIdle: time.Hour, Logger: o.log.With("device", id.Name)}
	if relay.IsValid() {
		cfg.Relay = relay
	}
	if flowLog != "" {
		f, err := os.Create(flowLog)
		if err != nil {
			return nil, nil, err
		}
		o.onStop(func() { f.Close() })
		cfg.FlowLog = f
	}
	var g *gateway.Gateway
	for try := 0; ; try++ {
		if g, err = gateway.New(cfg); err == nil {
			break
		}
		var busy *net.OpError // the relay's control port (data + 1) was taken
		if try > 50 || !errors.As(err, &busy) {
			return nil, nil, err
		}
		if relay.IsValid() {
			time.Sleep(20 * time.Millisecond) // the address of a relay just stopped
		}
	}
	stop, err := o.run("gateway "+id.Name, g.Run, g.Ready())
	if err != nil {
		return nil, nil, err
	}
	o.mu.Lock()
	o.gateways[id.Name] = g
	o.mu.Unlock()
	return g, stop, nil
}

// join enrolls a device as a host does with enclave join: a key made
// here, a join token an admin made for the identity, a signing request to
// the org key server's Enroll service over TLS without a client
// certificate; it returns the device's handshake credentials (its
// certificate is the issuing CA's, with it as chain).
func (o *org) join(ctx context.Context, id ca.Identity) (*handshake.Credentials, error) {
	req := &api.CreateJoinTokenRequest{Name: id.Name, Role: string(id.Role), Enclave: uint32(id.Enclave)}
	if id.HasServerID {
		k := uint32(id.ServerID)
		req.ServerId = &k
	}
	if id.Overlay.IsValid() {
		req.Overlay = id.Overlay.String()
	}
	tok, err := o.admin.CreateJoinToken(ctx, req)
	if err != nil {
		return nil, fmt.Errorf("join token for %s: %w", id.Name, err)
	}
	priv, csr, err := ca.NewKeyRequest()
	if err != nil {
		return nil, err
	}
	tlsCfg := &tls.Config{MinVersion: tls.VersionTLS13, RootCAs: o.auth.Roots().Pool(), ServerName: "127.0.0.1"}
	conn, err := grpc.NewClient(o.servers["ks-org"].addr, grpc.WithTransportCredentials(credentials.NewTLS(tlsCfg)))
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	r, err := api.NewEnrollClient(conn).Join(ctx, &api.JoinRequest{Token: tok.GetToken(), Csr: csr})
	if err != nil {
		return nil, fmt.Errorf("%s joining: %w", id.Name, err)
	}
	chain, err := ca.ParsePEMCerts(r.GetCertificatePem())
	if err != nil {
		return nil, err
	}
	return handshake.NewCredentials(o.auth.Roots(), chain[0], priv, chain[1:]...)
}
