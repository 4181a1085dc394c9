// Package orgtest runs a real key service for tests: a CA, a key server
// on loopback (gRPC over mTLS, bbolt store, audit log) and an admin
// connection to it, with helpers to issue certificates, make device
// credentials and register enclaves, devices and pairs. Tests of the
// agent, the gateway and the lab share it, so that each runs against the
// real service and none keeps a copy of the set-up.
package orgtest

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"net"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"

	"github.com/enclavekeys/enclave/internal/api"
	"github.com/enclavekeys/enclave/internal/audit"
	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/handshake"
	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/keyserver"
	"github.com/enclavekeys/enclave/internal/registry"
	"github.com/enclavekeys/enclave/internal/store"
)

// Start is when the org's certificates start to be valid (an hour after
// its CA's).
var Start = time.Now().UTC().Truncate(time.Second)

// Org is a running key service with its CA.
type Org struct {
	T     testing.TB
	Dir   string
	Auth  *ca.Authority
	Addr  string
	Admin api.AdminClient
	// AuditPath is the key service's audit log.
	AuditPath string
	// OrgKey is the org key, for tests that seal packets of SAs of their
	// own (a gateway reads them like any other).
	OrgKey keys.Key

	mu    sync.Mutex
	svc   *keyserver.Service
	creds *keyserver.Credentials
	gs    *keyserver.Server // nil while Down
}

// New starts a key service whose pairs rotate hourly with the given
// grace; everything stops when the test ends.
func New(t testing.TB, grace time.Duration) *Org {
	t.Helper()
	dir := t.TempDir()
	auth, err := ca.Init(filepath.Join(dir, "ca"), "example.org", Start.Add(-time.Hour))
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
	o := &Org{T: t, Dir: dir, Auth: auth, AuditPath: filepath.Join(dir, "audit.log"), OrgKey: orgKey}
	al, err := audit.Open(o.AuditPath, nil, st)
	if err != nil {
		t.Fatal(err)
	}
	svc, err := keyserver.New(keyserver.Config{Store: st, OrgKey: orgKey, Roots: auth.Roots(), Audit: al,
		Rotation: registry.Rotation{Interval: time.Hour, Grace: grace}})
	if err != nil {
		t.Fatal(err)
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	o.Addr = lis.Addr().String()
	o.svc, o.creds = svc, o.TLSCreds(ca.Identity{Name: "ks", Role: ca.RoleKeyserver}, "127.0.0.1")
	o.serve(lis)
	done := make(chan struct{})
	go func() { svc.Run(ctx); close(done) }()
	t.Cleanup(func() {
		cancel()
		<-done
		o.Down()
		al.Close()
		st.Close()
	})
	o.Admin = api.NewAdminClient(o.Dial(ca.Identity{Name: "alice", Role: ca.RoleAdmin}))
	return o
}

func (o *Org) serve(lis net.Listener) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.gs = keyserver.NewServer(o.svc, o.creds)
	go o.gs.Serve(lis)
}

// Down stops answering: the key service's listener closes and its
// connections break (an outage, or a key server not started yet).
func (o *Org) Down() {
	o.mu.Lock()
	gs := o.gs
	o.gs = nil
	o.mu.Unlock()
	if gs != nil {
		gs.Stop()
	}
}

// Up answers again on the same address after Down.
func (o *Org) Up() {
	o.T.Helper()
	var lis net.Listener
	var err error
	for try := 0; try < 100; try++ { // the port may linger a moment
		if lis, err = net.Listen("tcp", o.Addr); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		o.T.Fatal(err)
	}
	o.serve(lis)
}

// Issue makes a certificate and key for id.
func (o *Org) Issue(id ca.Identity, hosts ...string) (*x509.Certificate, []byte, []byte) {
	o.T.Helper()
	is, err := o.Auth.Issue(id, hosts, 30, Start)
	if err != nil {
		o.T.Fatal(err)
	}
	return is.Cert, is.CertPEM, is.KeyPEM
}

// Credentials issues a certificate for id and makes the handshake
// credentials of a device holding it.
func (o *Org) Credentials(id ca.Identity) *handshake.Credentials {
	o.T.Helper()
	cert, _, keyPEM := o.Issue(id)
	key, err := ca.ParseKeyPEM(keyPEM)
	if err != nil {
		o.T.Fatal(err)
	}
	creds, err := handshake.NewCredentials(o.Auth.Roots(), cert, key)
	if err != nil {
		o.T.Fatal(err)
	}
	return creds
}

// JoinedCredentials are the handshake credentials of a device that
// joined: its certificate signed by an issuing CA under the org CA (as
// the key service's issuer signs), carried with that CA's certificate.
func (o *Org) JoinedCredentials(id ca.Identity) *handshake.Credentials {
	o.T.Helper()
	iss, err := o.Auth.IssueIssuer("ks", 30, Start)
	if err != nil {
		o.T.Fatal(err)
	}
	issKey, err := ca.ParseKeyPEM(iss.KeyPEM)
	if err != nil {
		o.T.Fatal(err)
	}
	issuer, err := ca.NewIssuer(iss.Cert, issKey)
	if err != nil {
		o.T.Fatal(err)
	}
	is, err := issuer.Issue(id, nil, 30, Start)
	if err != nil {
		o.T.Fatal(err)
	}
	key, err := ca.ParseKeyPEM(is.KeyPEM)
	if err != nil {
		o.T.Fatal(err)
	}
	creds, err := handshake.NewCredentials(o.Auth.Roots(), is.Cert, key, iss.Cert)
	if err != nil {
		o.T.Fatal(err)
	}
	return creds
}

// TLSCreds issues a certificate for id and makes its mTLS credentials.
func (o *Org) TLSCreds(id ca.Identity, hosts ...string) *keyserver.Credentials {
	o.T.Helper()
	_, certPEM, keyPEM := o.Issue(id, hosts...)
	pair, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		o.T.Fatal(err)
	}
	return &keyserver.Credentials{Roots: o.Auth.Roots(), Cert: pair}
}

// Dial connects to the key service as id (closed when the test ends).
func (o *Org) Dial(id ca.Identity) *grpc.ClientConn {
	o.T.Helper()
	// Reconnect within a second after an outage (Down, Up), as the
	// command line's connections do within a few.
	reconnect := grpc.ConnectParams{MinConnectTimeout: 5 * time.Second, Backoff: backoff.Config{BaseDelay: 100 * time.Millisecond, Multiplier: 1.6, MaxDelay: time.Second}}
	conn, err := keyserver.Dial(o.Addr, "127.0.0.1", o.TLSCreds(id), grpc.WithConnectParams(reconnect))
	if err != nil {
		o.T.Fatal(err)
	}
	o.T.Cleanup(func() { conn.Close() })
	return conn
}

// KeyService is a key-service client for id.
func (o *Org) KeyService(id ca.Identity) api.KeyServiceClient {
	return api.NewKeyServiceClient(o.Dial(id))
}

// Register adds enclaves (by id), devices and allowed pairs.
func (o *Org) Register(enclaves []uint32, devices []*api.AddDeviceRequest, pairs [][2]uint32) {
	o.T.Helper()
	ctx := context.Background()
	for _, e := range enclaves {
		if _, err := o.Admin.AddEnclave(ctx, &api.AddEnclaveRequest{Id: e, Name: "e" + strconv.Itoa(int(e))}); err != nil {
			o.T.Fatal(err)
		}
	}
	for _, d := range devices {
		if _, err := o.Admin.AddDevice(ctx, d); err != nil {
			o.T.Fatal(err)
		}
	}
	for _, p := range pairs {
		if _, err := o.Admin.AllowPair(ctx, &api.AllowPairRequest{A: p[0], B: p[1]}); err != nil {
			o.T.Fatal(err)
		}
	}
}

// U32 points at v (for optional proto fields).
func U32(v uint32) *uint32 { return &v }
