package agent

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"net"
	"net/netip"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/grpc"

	"github.com/enclavekeys/enclave/internal/api"
	"github.com/enclavekeys/enclave/internal/audit"
	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/handshake"
	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/keyserver"
	"github.com/enclavekeys/enclave/internal/registry"
	"github.com/enclavekeys/enclave/internal/store"
)

var start = time.Now().UTC().Truncate(time.Second)

// org is a real key service on loopback (gRPC over mTLS, bbolt store,
// audit log) with its CA, and an admin connection to it.
type org struct {
	t     testing.TB
	dir   string
	auth  *ca.Authority
	addr  string
	admin api.AdminClient
}

func newOrg(t testing.TB, grace time.Duration) *org {
	t.Helper()
	dir := t.TempDir()
	auth, err := ca.Init(filepath.Join(dir, "ca"), "example.org", start.Add(-time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	kek, _ := store.NewKEK(make([]byte, 32))
	st, err := store.OpenBolt(filepath.Join(dir, "ks.db"), kek)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	orgKey, err := store.OrgKey(ctx, st, kek, nil, true)
	if err != nil {
		t.Fatal(err)
	}
	al, err := audit.Open(filepath.Join(dir, "audit.log"), nil, st)
	if err != nil {
		t.Fatal(err)
	}
	svc, err := keyserver.New(keyserver.Config{Store: st, OrgKey: orgKey, Root: auth.Cert, Audit: al,
		Rotation: registry.Rotation{Interval: time.Hour, Grace: grace}})
	if err != nil {
		t.Fatal(err)
	}
	o := &org{t: t, dir: dir, auth: auth}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	o.addr = lis.Addr().String()
	gs := keyserver.NewGRPCServer(svc, o.tlsCreds(ca.Identity{Name: "ks", Role: ca.RoleKeyserver}, "127.0.0.1"))
	go gs.Serve(lis)
	done := make(chan struct{})
	go func() { svc.Run(ctx); close(done) }()
	t.Cleanup(func() {
		cancel()
		<-done
		gs.Stop()
		al.Close()
		st.Close()
	})
	o.admin = api.NewAdminClient(o.dial(ca.Identity{Name: "alice", Role: ca.RoleAdmin}))
	return o
}

// issue makes a certificate and key for id.
func (o *org) issue(id ca.Identity, hosts ...string) (*x509.Certificate, []byte, []byte) {
	o.t.Helper()
	is, err := o.auth.Issue(id, hosts, 30, start)
	if err != nil {
		o.t.Fatal(err)
	}
	return is.Cert, is.CertPEM, is.KeyPEM
}

func (o *org) tlsCreds(id ca.Identity, hosts ...string) *keyserver.Credentials {
	o.t.Helper()
	_, certPEM, keyPEM := o.issue(id, hosts...)
	pair, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		o.t.Fatal(err)
	}
	return &keyserver.Credentials{Root: o.auth.Cert, Cert: pair}
}

func (o *org) dial(id ca.Identity) *grpc.ClientConn {
	o.t.Helper()
	conn, err := keyserver.Dial(o.addr, "127.0.0.1", o.tlsCreds(id))
	if err != nil {
		o.t.Fatal(err)
	}
	o.t.Cleanup(func() { conn.Close() })
	return conn
}

// register adds enclaves (by id), devices and allowed pairs.
func (o *org) register(enclaves []uint32, devices []*api.AddDeviceRequest, pairs [][2]uint32) {
	o.t.Helper()
	ctx := context.Background()
	for _, e := range enclaves {
		if _, err := o.admin.AddEnclave(ctx, &api.AddEnclaveRequest{Id: e, Name: "e" + string(rune('a'+e%26)) + itoa(e)}); err != nil {
			o.t.Fatal(err)
		}
	}
	for _, d := range devices {
		if _, err := o.admin.AddDevice(ctx, d); err != nil {
			o.t.Fatal(err)
		}
	}
	for _, p := range pairs {
		if _, err := o.admin.AllowPair(ctx, &api.AllowPairRequest{A: p[0], B: p[1]}); err != nil {
			o.t.Fatal(err)
		}
	}
}

func itoa(v uint32) string {
	if v == 0 {
		return "0"
	}
	var b []byte
	for ; v > 0; v /= 10 {
		b = append([]byte{byte('0' + v%10)}, b...)
	}
	return string(b)
}

func u32(v uint32) *uint32 { return &v }

// agentFor starts an agent for id on loopback. A server (id.Role server)
// gets a key-service connection. It retries ports until the data port and
// the one after it are both free.
func (o *org) agentFor(id ca.Identity, routes []Route, tweak func(*Config)) *Agent {
	o.t.Helper()
	cert, _, keyPEM := o.issue(id)
	key, err := ca.ParseKeyPEM(keyPEM)
	if err != nil {
		o.t.Fatal(err)
	}
	creds, err := handshake.NewCredentials(o.auth.Cert, cert, key)
	if err != nil {
		o.t.Fatal(err)
	}
	cfg := Config{Credentials: creds, Routes: routes}
	if id.Role == ca.RoleServer {
		cfg.KeyService = api.NewKeyServiceClient(o.dial(id))
	}
	if tweak != nil {
		tweak(&cfg)
	}
	var a *Agent
	for try := 0; ; try++ {
		cfg.Listen = netip.MustParseAddrPort("127.0.0.1:0")
		if a, err = New(cfg); err == nil {
			break
		}
		if try > 50 {
			o.t.Fatal(err)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	o.t.Cleanup(func() { cancel(); <-done })
	select {
	case <-a.Ready():
	case err := <-done:
		o.t.Fatalf("agent did not start: %v", err)
	}
	return a
}

func waitFor(t testing.TB, d time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met in time")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func route(a *Agent) Route {
	return Route{Prefix: netip.PrefixFrom(a.Addr(), a.Addr().BitLen()), Endpoint: a.DataPort()}
}

func serverID(name string, e keys.EnclaveID, k keys.ServerID, ip string) ca.Identity {
	return ca.Identity{Name: name, Role: ca.RoleServer, Enclave: e, ServerID: k, HasServerID: true, Overlay: netip.MustParsePrefix(ip)}
}

func clientID(name string, e keys.EnclaveID, ip string) ca.Identity {
	return ca.Identity{Name: name, Role: ca.RoleClient, Enclave: e, Overlay: netip.MustParsePrefix(ip)}
}
