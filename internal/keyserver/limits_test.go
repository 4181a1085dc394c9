package keyserver

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"github.com/enclavekeys/enclave/internal/api"
	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/gather"
)

func codeOf(err error) codes.Code { return status.Code(err) }

// TestBoundedRequests: no request field can make an audit line the
// verifier cannot read back, or the service write without bound. Each
// case is refused, and the audit log still verifies afterwards.
func TestBoundedRequests(t *testing.T) {
	l := newLab(t)
	admin := setup(t, l)
	web := l.client(idServer)
	gw := l.client(idGateway)
	ctx := context.Background()
	huge := strings.Repeat("g", 600_000)
	big := strings.Repeat("g", 60_000)
	cases := []struct {
		name string
		call func() error
		want codes.Code
	}{
		{"600 kB gateway name", func() error {
			return second(web.AuthorizeDirectKeyExchange(ctx, &api.AuthorizeDirectKeyExchangeRequest{Gateway: huge, Enclave: 3, Peer: 7}))
		}, codes.ResourceExhausted},
		{"60 kB gateway name", func() error {
			return second(web.AuthorizeDirectKeyExchange(ctx, &api.AuthorizeDirectKeyExchangeRequest{Gateway: big, Enclave: 3, Peer: 7}))
		}, codes.InvalidArgument},
		{"1.1 MB enclave name", func() error {
			return second(admin.AddEnclave(ctx, &api.AddEnclaveRequest{Id: 20, Name: strings.Repeat("e", 1_100_000)}))
		}, codes.ResourceExhausted},
		{"60 kB enclave name", func() error { return second(admin.AddEnclave(ctx, &api.AddEnclaveRequest{Id: 20, Name: big})) }, codes.InvalidArgument},
		{"60 kB device name", func() error {
			return second(admin.AddDevice(ctx, &api.AddDeviceRequest{Name: big, Role: "client"}))
		}, codes.InvalidArgument},
		{"bad fingerprint", func() error {
			return second(admin.AddDevice(ctx, &api.AddDeviceRequest{Name: "x", Role: "client", Fingerprint: big}))
		}, codes.InvalidArgument},
		{"60 kB revoke name", func() error { return second(admin.RevokeDevice(ctx, &api.RevokeDeviceRequest{Name: big})) }, codes.InvalidArgument},
		{"60 kB grant device", func() error {
			return second(admin.AddGrant(ctx, &api.AddGrantRequest{Device: big, Pairs: []*api.Pair{{A: 3, B: 7}}}))
		}, codes.InvalidArgument},
		{"too many pairs", func() error {
			ps := make([]*api.Pair, MaxPairsPerRequest+1)
			for i := range ps {
				ps[i] = &api.Pair{A: 3, B: 7}
			}
			return second(gw.GetPairKeys(ctx, &api.GetPairKeysRequest{Pairs: ps}))
		}, codes.InvalidArgument},
	}
	for _, c := range cases {
		if err := c.call(); codeOf(err) != c.want {
			t.Errorf("%s: %v, want %s", c.name, err, c.want)
		}
	}
	res := l.verifyAudit()
	if res.Entries == 0 {
		t.Fatal("nothing audited")
	}
}

// TestPairListDeduplicated: a pair named many times is issued and audited
// once per generation.
func TestPairListDeduplicated(t *testing.T) {
	l := newLab(t)
	setup(t, l)
	gw := l.client(idGateway)
	before := l.verifyAudit().Entries
	ps := make([]*api.Pair, MaxPairsPerRequest)
	for i := range ps {
		ps[i] = &api.Pair{A: 3, B: 7}
		if i%2 == 1 {
			ps[i] = &api.Pair{A: 7, B: 3}
		}
	}
	got, err := gw.GetPairKeys(context.Background(), &api.GetPairKeysRequest{Pairs: ps})
	if err != nil {
		t.Fatal(err)
	}
	if len(got.GetKeys()) != 1 {
		t.Fatalf("%d keys for one pair asked %d times", len(got.GetKeys()), len(ps))
	}
	if n := l.verifyAudit().Entries - before; n != 1 {
		t.Fatalf("%d audit lines for one key", n)
	}
}

// TestCancelledRequestStops: a request whose caller has gone issues and
// audits nothing more.
func TestCancelledRequestStops(t *testing.T) {
	l := newLab(t)
	setup(t, l)
	creds := l.creds(idMonitor)
	leaf, err := x509.ParseCertificate(creds.Cert.Certificate[0])
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(peer.NewContext(context.Background(), &peer.Peer{
		AuthInfo: credentials.TLSInfo{State: tls.ConnectionState{VerifiedChains: [][]*x509.Certificate{{leaf, l.auth.Cert}}}},
	}))
	cancel()
	before := l.verifyAudit().Entries
	_, err = l.svc.GetPairKeys(ctx, &api.GetPairKeysRequest{})
	if codeOf(err) != codes.Canceled {
		t.Fatalf("cancelled request: %v, want Canceled", err)
	}
	if n := l.verifyAudit().Entries - before; n != 0 {
		t.Fatalf("a cancelled request wrote %d audit lines", n)
	}
}

// TestDirectKeyExchangeOutsiders: a server outside the pair learns nothing
// about devices (registered or not, revoked or not, gateway or not).
func TestDirectKeyExchangeOutsiders(t *testing.T) {
	l := newLab(t)
	admin := setup(t, l)
	ctx := context.Background()
	register(t, admin, nil, []*api.AddDeviceRequest{{Name: "lab1", Role: "server", Enclave: 9, ServerId: u32(77)}, {Name: "gwr", Role: "gateway"}}, nil)
	if _, err := admin.RevokeDevice(ctx, &api.RevokeDeviceRequest{Name: "gwr"}); err != nil {
		t.Fatal(err)
	}
	// Every cause gets one answer (the asked name aside), which names no
	// registry fact, whoever asks.
	sameAnswer := func(who string, c client, peer uint32, names ...string) {
		t.Helper()
		var reasons []string
		for _, name := range names {
			a, err := c.AuthorizeDirectKeyExchange(ctx, &api.AuthorizeDirectKeyExchangeRequest{Gateway: name, Enclave: 3, Peer: peer})
			if err != nil || a.GetAllowed() {
				t.Fatalf("%s, %s: %v %v", who, name, a, err)
			}
			reasons = append(reasons, strings.ReplaceAll(a.GetReason(), name, "X"))
		}
		for _, r := range reasons {
			if r != reasons[0] || strings.Contains(r, "revoked") || strings.Contains(r, "client") || strings.Contains(r, "registered") {
				t.Fatalf("an %s learns something: %q", who, reasons)
			}
		}
	}
	outsider := l.client(ca.Identity{Name: "lab1", Role: ca.RoleServer, Enclave: 9, ServerID: 77, HasServerID: true})
	sameAnswer("outsider", outsider, 7, "gw", "gwr", "laptop", "nosuch")
	// A party to the pair learns no more (issue 31): the cause is in the
	// audit log only.
	sameAnswer("insider", l.client(idServer), 9, "gwr", "laptop", "nosuch", "ids")
	if log := readFile(t, l.audit); !strings.Contains(log, `gateway \"gwr\" is revoked`) || !strings.Contains(log, `gateway \"nosuch\" is not registered`) {
		t.Fatalf("the causes are not in the audit log:\n%s", log)
	}
}

// TestNothingCommittedUnaudited: when the audit log cannot be written, an
// admin change is refused and is not in the registry afterwards.
func TestNothingCommittedUnaudited(t *testing.T) {
	l := newLab(t)
	admin := setup(t, l)
	ctx := context.Background()
	l.sink.Close() // the real log, closed: every Append now fails
	if _, err := admin.RevokeDevice(ctx, &api.RevokeDeviceRequest{Name: "web1"}); codeOf(err) != codes.Unavailable {
		t.Fatalf("revoke with the audit log down: %v, want Unavailable", err)
	}
	if _, err := admin.AddEnclave(ctx, &api.AddEnclaveRequest{Id: 11, Name: "new"}); codeOf(err) != codes.Unavailable {
		t.Fatalf("add enclave with the audit log down: %v", err)
	}
	st, err := l.svc.store.View(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if d, _ := st.Device("web1"); d.Revoked {
		t.Fatal("the revocation was committed without an audit entry")
	}
	if _, ok := st.Enclave(11); ok {
		t.Fatal("the enclave was committed without an audit entry")
	}
}

// TestRefusalsThrottled: a revoked gateway that keeps asking gets its first
// refusals audited one by one, then is throttled; what follows is written
// as one summary line, and after a pause it is heard again.
func TestRefusalsThrottled(t *testing.T) {
	l := newLab(t)
	admin := setup(t, l)
	ctx := context.Background()
	if _, err := admin.RevokeDevice(ctx, &api.RevokeDeviceRequest{Name: "gw"}); err != nil {
		t.Fatal(err)
	}
	gw := l.client(idGateway)
	before := l.verifyAudit().Entries
	denied, throttled := tally(t, 300, codes.PermissionDenied, func(int) codes.Code {
		return codeOf(second(gw.GetPairKeys(ctx, &api.GetPairKeysRequest{})))
	})
	if denied != refusalBurst || throttled != 300-refusalBurst {
		t.Fatalf("%d denied, %d throttled; want %d and %d", denied, throttled, refusalBurst, 300-refusalBurst)
	}
	if n := l.verifyAudit().Entries - before; n != refusalBurst {
		t.Fatalf("%d audit lines for %d refusals before the summary, want %d", n, 300, refusalBurst)
	}
	// Other callers are not held back.
	if _, err := l.client(idServer).GetServerKeys(ctx, &api.GetServerKeysRequest{}); err != nil {
		t.Fatalf("another caller: %v", err)
	}
	mid := l.verifyAudit().Entries
	l.clock.Advance(flushInterval)
	waitFor(t, func() bool { return l.verifyAudit().Entries == mid+1 })
	if !strings.Contains(readFile(t, l.audit), "280 more refused or throttled calls") {
		t.Fatal("the summary line does not count the throttled calls")
	}
	// The budget refills: a minute later it is refused (and audited) again.
	l.clock.Advance(time.Minute)
	if code := codeOf(second(gw.GetPairKeys(ctx, &api.GetPairKeysRequest{}))); code != codes.PermissionDenied {
		t.Fatalf("after a pause: %s", code)
	}
}

// waitFor polls cond for up to five seconds (the flusher runs on its own
// goroutine after the fake clock moves).
func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	for i := 0; i < 500; i++ {
		if cond() {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatal("condition not met in time")
}

// TestWatchTellsRevocations: a server watching generations hears of every
// other device's revocation (in the snapshot, and as it happens), so that
// it can refuse the device and end its SAs at once; a client hears nothing
// (it may not watch at all).
func TestWatchTellsRevocations(t *testing.T) {
	eachTransport(t, func(t *testing.T, lean bool) {
		l := newLab(t)
		l.lean = lean
		admin := setup(t, l)
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		if _, err := admin.RevokeDevice(ctx, &api.RevokeDeviceRequest{Name: "ids"}); err != nil {
			t.Fatal(err)
		}
		stream, err := l.client(idServer).WatchGenerations(ctx, &api.WatchGenerationsRequest{})
		if err != nil {
			t.Fatal(err)
		}
		revoked := map[string]bool{}
		next := func() *api.GenerationEvent {
			ev, err := stream.Recv()
			if err != nil {
				t.Fatal(err)
			}
			if ev.Kind == api.GenerationEvent_DEVICE_REVOKED {
				revoked[ev.GetDevice()] = true
			}
			return ev
		}
		for !revoked["ids"] {
			next()
		}
		if _, err := admin.RevokeDevice(ctx, &api.RevokeDeviceRequest{Name: "laptop"}); err != nil {
			t.Fatal(err)
		}
		for !revoked["laptop"] {
			next()
		}
		client, err := l.client(idClient).WatchGenerations(ctx, &api.WatchGenerationsRequest{})
		if err == nil {
			_, err = client.Recv()
		}
		if codeOf(err) != codes.PermissionDenied {
			t.Fatalf("a client watching: %v", err)
		}
	})
}

// TestWatchBounds (issue 36): a device holds at most --max-watchers-per-device
// watch streams and the replica serves at most --max-watchers; a stream
// past either is refused (ResourceExhausted, saying which bound), and a
// closed stream frees its place. The gauge counts the open streams.
func TestWatchBounds(t *testing.T) {
	eachTransport(t, func(t *testing.T, lean bool) {
		m := NewMetrics()
		l := newLabWith(t, func(c *Config, _ *ca.Authority) {
			c.MaxWatchers, c.MaxWatchersPerDevice = 3, 2
			c.Metrics = m
		})
		l.lean = lean
		setup(t, l)
		var held []any // the streams open (the transport's connection closes once garbage)
		defer func() { _ = held }()
		open := func(id ca.Identity) (context.CancelFunc, error) {
			ctx, cancel := context.WithCancel(context.Background())
			stream, err := l.client(id).WatchGenerations(ctx, &api.WatchGenerationsRequest{})
			held = append(held, stream)
			if err == nil {
				_, err = stream.Recv() // the first event, or the refusal
			}
			if err != nil {
				cancel()
			}
			return cancel, err
		}
		first, err := open(idServer)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := open(idServer); err != nil {
			t.Fatal(err)
		}
		_, err = open(idServer)
		if codeOf(err) != codes.ResourceExhausted || !strings.Contains(status.Convert(err).Message(), "--max-watchers-per-device") {
			t.Fatalf("a third stream of one device: %v", err)
		}
		gw := ca.Identity{Name: "gw", Role: ca.RoleGateway}
		if _, err := open(gw); err != nil {
			t.Fatal(err)
		}
		_, err = open(ca.Identity{Name: "ids", Role: ca.RoleMonitor})
		if codeOf(err) != codes.ResourceExhausted || !strings.Contains(status.Convert(err).Message(), "--max-watchers)") {
			t.Fatalf("a stream past the replica's bound: %v", err)
		}
		if n, err := gather.Sum(m.registry, "enclave_keyserver_watchers", nil); err != nil || n != 3 {
			t.Errorf("watchers gauge %v (%v), want 3", n, err)
		}
		over, other := transportGRPC, transportWatch
		if lean {
			over, other = other, over
		}
		if n, err := gather.Sum(m.registry, "enclave_keyserver_watch_streams", map[string]string{"transport": over}); err != nil || n != 3 {
			t.Errorf("streams over %s: %v (%v), want 3", over, n, err)
		}
		if n, err := gather.Sum(m.registry, "enclave_keyserver_watch_streams", map[string]string{"transport": other}); err != nil || n != 0 {
			t.Errorf("streams over %s: %v (%v), want 0", other, n, err)
		}
		first()
		waitFor(t, func() bool { return l.svc.hub.watchers() == 2 })
		if _, err := open(ca.Identity{Name: "ids", Role: ca.RoleMonitor}); err != nil {
			t.Fatalf("a stream after one closed: %v", err)
		}
	})
}
