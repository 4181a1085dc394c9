package keyserver

import (
	"context"
	"crypto/tls"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/enclavekeys/enclave/internal/api"
	"github.com/enclavekeys/enclave/internal/audit"
	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/store"
)

// t0 is where the fake clock starts: now, to the second, because the TLS
// layer checks certificates against the real clock (a fixed date would
// turn every certificate of these tests invalid a month later).
var t0 = time.Now().UTC().Truncate(time.Second)

// fakeClock moves only when told to.
type fakeClock struct {
	mu      sync.Mutex
	now     time.Time
	waiters []waiter
}

type waiter struct {
	at time.Time
	ch chan time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) After(d time.Duration) <-chan time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	ch := make(chan time.Time, 1)
	if d <= 0 {
		ch <- c.now
		return ch
	}
	c.waiters = append(c.waiters, waiter{c.now.Add(d), ch})
	return ch
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
	kept := c.waiters[:0]
	for _, w := range c.waiters {
		if !w.at.After(c.now) {
			w.ch <- c.now
		} else {
			kept = append(kept, w)
		}
	}
	c.waiters = kept
}

// lab is a running key service on loopback with a CA and a way to make
// clients of any identity.
type lab struct {
	t      testing.TB
	dir    string
	auth   *ca.Authority
	clock  *fakeClock
	svc    *Service
	addr   string
	orgKey keys.Key
	audit  string
	sink   audit.Sink
	cancel context.CancelFunc
	// stop stops the service and closes its store and log (once; the
	// test's cleanup calls it too).
	stop func()
	// lean: the clients watch over the watch transport, not gRPC.
	lean bool
}

// eachTransport runs f for watches over gRPC, then over the watch
// transport (WatchProtocol): both serve the same stream.
func eachTransport(t *testing.T, f func(t *testing.T, lean bool)) {
	for _, lean := range []bool{false, true} {
		name := "grpc"
		if lean {
			name = "transport"
		}
		t.Run(name, func(t *testing.T) { f(t, lean) })
	}
}

func newLab(t testing.TB) *lab {
	t.Helper()
	return newLabWith(t, nil)
}

// newLabWith is newLab with a change to the service's configuration,
// made knowing the lab's CA.
func newLabWith(t testing.TB, tweak func(*Config, *ca.Authority)) *lab {
	t.Helper()
	dir := t.TempDir()
	clock := &fakeClock{now: t0}
	auth, err := ca.Init(filepath.Join(dir, "ca"), "example.org", t0)
	if err != nil {
		t.Fatal(err)
	}
	st, err := store.OpenBolt(filepath.Join(dir, "enclave.db"), testKEK(t))
	if err != nil {
		t.Fatal(err)
	}
	auditPath := filepath.Join(dir, "audit.log")
	al, err := audit.Open(auditPath, clock.Now, st)
	if err != nil {
		t.Fatal(err)
	}
	var tier func(*Config)
	if tweak != nil {
		tier = func(c *Config) { tweak(c, auth) }
	}
	l := startLab(t, auth, clock, st, al, tier)
	l.dir, l.audit = dir, auditPath
	return l
}

// startLab runs a Service over st and sink on a loopback port.
func startLab(t testing.TB, auth *ca.Authority, clock *fakeClock, st store.Store, sink audit.Sink, tier func(*Config)) *lab {
	return startLabAs(t, auth, clock, st, sink, tier, nil)
}

// startLabAs is startLab with the key server's own TLS credentials given
// (nil: a keyserver certificate without an enclave).
func startLabAs(t testing.TB, auth *ca.Authority, clock *fakeClock, st store.Store, sink audit.Sink, tier func(*Config), ksCreds *Credentials) *lab {
	t.Helper()
	cfg := Config{Store: st, Roots: auth.Roots(), Audit: sink, Clock: clock}
	if tier != nil {
		tier(&cfg)
	}
	var ok keys.Key
	if cfg.Tier != TierEnclave { // an enclave tier never holds the org key
		var err error
		if ok, err = store.OrgKey(context.Background(), st, testKEK(t), nil, true); err != nil {
			t.Fatal(err)
		}
		cfg.OrgKey = ok
	}
	svc, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	l := &lab{t: t, auth: auth, clock: clock, svc: svc, orgKey: ok, sink: sink}
	if ksCreds == nil {
		ksCreds = l.creds(ca.Identity{Name: "ks", Role: ca.RoleKeyserver}, "127.0.0.1")
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	l.addr = lis.Addr().String()
	if cfg.Conns != nil {
		lis = cfg.Conns.Listener(lis)
	}
	gs := NewServer(svc, ksCreds)
	go gs.Serve(lis)
	ctx, cancel := context.WithCancel(context.Background())
	l.cancel = cancel
	done := make(chan struct{})
	go func() { svc.Run(ctx); close(done) }()
	var once sync.Once
	l.stop = func() {
		once.Do(func() {
			cancel()
			<-done
			gs.Stop()
			sink.Close()
			st.Close()
		})
	}
	t.Cleanup(l.stop)
	return l
}

// creds issues a certificate for id (valid from the fake clock's time) and
// returns client credentials for it.
func (l *lab) creds(id ca.Identity, hosts ...string) *Credentials {
	l.t.Helper()
	return credsFrom(l.t, l.auth, id, t0, hosts...)
}

func credsFrom(t testing.TB, auth *ca.Authority, id ca.Identity, now time.Time, hosts ...string) *Credentials {
	t.Helper()
	is, err := auth.Issue(id, hosts, 30, now)
	if err != nil {
		t.Fatal(err)
	}
	pair, err := tls.X509KeyPair(is.CertPEM, is.KeyPEM)
	if err != nil {
		t.Fatal(err)
	}
	return &Credentials{Roots: auth.Roots(), Cert: pair}
}

type client struct {
	api.KeyServiceClient
	api.AdminClient
}

func (l *lab) client(id ca.Identity) client {
	l.t.Helper()
	return l.clientWith(l.creds(id))
}

func (l *lab) clientWith(c *Credentials) client {
	l.t.Helper()
	conn := l.connWith(c)
	kc := api.NewKeyServiceClient(conn)
	if l.lean {
		var err error
		if kc, err = WithWatchTransport(kc, l.addr, "127.0.0.1", NewLive(c), nil); err != nil {
			l.t.Fatal(err)
		}
	}
	return client{kc, api.NewAdminClient(conn)}
}

// connWith dials the lab's key service with c, until the test ends.
func (l *lab) connWith(c *Credentials) *grpc.ClientConn {
	l.t.Helper()
	conn, err := Dial(l.addr, "127.0.0.1", c)
	if err != nil {
		l.t.Fatal(err)
	}
	l.t.Cleanup(func() { conn.Close() })
	return conn
}

func (l *lab) verifyAudit() audit.Result {
	l.t.Helper()
	f, err := os.Open(l.audit)
	if err != nil {
		l.t.Fatal(err)
	}
	defer f.Close()
	res, err := audit.Verify(f)
	if err != nil {
		l.t.Fatalf("audit log: %v", err)
	}
	return res
}

func readFile(t testing.TB, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func fmtHex(b []byte) string {
	const digits = "0123456789abcdef"
	out := make([]byte, 2*len(b))
	for i, c := range b {
		out[2*i], out[2*i+1] = digits[c>>4], digits[c&15]
	}
	return string(out)
}

// testKEK is the key-encryption key of every test store.
func testKEK(t testing.TB) *store.KEK {
	t.Helper()
	k, err := store.NewKEK(make([]byte, 32))
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// tally makes n calls and counts those answered want and those
// throttled (ResourceExhausted); any other answer fails the test.
func tally(t testing.TB, n int, want codes.Code, call func(i int) codes.Code) (wanted, throttled int) {
	t.Helper()
	for i := range n {
		switch code := call(i); code {
		case want:
			wanted++
		case codes.ResourceExhausted:
			throttled++
		default:
			t.Fatalf("call %d: %s", i, code)
		}
	}
	return wanted, throttled
}
