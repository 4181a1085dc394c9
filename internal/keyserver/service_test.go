package keyserver

import (
	"bytes"
	"context"
	"io"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/enclavekeys/enclave/internal/api"
	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/keys"
)

var (
	idAdmin   = ca.Identity{Name: "alice", Role: ca.RoleAdmin}
	idServer  = ca.Identity{Name: "web1", Role: ca.RoleServer, Enclave: 3, ServerID: 258, HasServerID: true}
	idServer2 = ca.Identity{Name: "db1", Role: ca.RoleServer, Enclave: 7, ServerID: 9, HasServerID: true}
	idClient  = ca.Identity{Name: "laptop", Role: ca.RoleClient, Enclave: 7}
	idGateway = ca.Identity{Name: "gw", Role: ca.RoleGateway}
	idMonitor = ca.Identity{Name: "ids", Role: ca.RoleMonitor}
	idEncKS   = ca.Identity{Name: "ks3", Role: ca.RoleKeyserver, Enclave: 3}
)

func u32(v uint32) *uint32 { return &v }

// setup is the README flow: two enclaves, a server in each, a client, a
// gateway and a monitor; pair 3-7 allowed; the gateway granted it; enclave
// 9 exists but may not talk to anyone.
func setup(t testing.TB, l *lab) client {
	t.Helper()
	admin := l.client(idAdmin)
	register(t, admin,
		[]*api.AddEnclaveRequest{{Id: 3, Name: "web"}, {Id: 7, Name: "db"}, {Id: 9, Name: "lab"}},
		[]*api.AddDeviceRequest{
			{Name: "web1", Role: "server", Enclave: 3, ServerId: u32(258)},
			{Name: "db1", Role: "server", Enclave: 7, ServerId: u32(9)},
			{Name: "laptop", Role: "client", Enclave: 7},
			{Name: "gw", Role: "gateway"},
			{Name: "ids", Role: "monitor"},
			{Name: "ks3", Role: "keyserver", Enclave: 3},
		},
		[]*api.AllowPairRequest{{A: 3, B: 7}})
	ctx := context.Background()
	for _, g := range []*api.AddGrantRequest{{Device: "gw", Pairs: []*api.Pair{{A: 7, B: 3}}}, {Device: "ids", All: true}} {
		if _, err := admin.AddGrant(ctx, g); err != nil {
			t.Fatalf("grant %v: %v", g, err)
		}
	}
	return admin
}

func TestKeysMatchDerivation(t *testing.T) {
	l := newLab(t)
	setup(t, l)
	ctx := context.Background()
	sk, err := l.client(idServer).GetServerKeys(ctx, &api.GetServerKeysRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if len(sk.Keys) != 1 {
		t.Fatalf("server keys: %d, want 1 (peer 7, generation 1)", len(sk.Keys))
	}
	k := sk.Keys[0]
	ek, _ := keys.PairKey(&l.orgKey, 3, 7, keys.Generation(k.Validity.Generation))
	want, _ := keys.ServerKey(&ek, keys.VC{Enclave: 3, Peer: 7, Server: 258})
	if k.Enclave != 3 || k.Peer != 7 || k.Server != 258 || !bytes.Equal(k.Key, want[:]) || !k.Validity.Current {
		t.Fatalf("server key %+v does not match SK(3,7,258,%d)", k, k.Validity.Generation)
	}
	if !k.Validity.ValidUntil.AsTime().After(k.Validity.ValidFrom.AsTime()) {
		t.Fatal("validity window")
	}
	pk, err := l.client(idGateway).GetPairKeys(ctx, &api.GetPairKeysRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if len(pk.Keys) != 1 || pk.Keys[0].Pair.A != 3 || pk.Keys[0].Pair.B != 7 || !bytes.Equal(pk.Keys[0].Key, ek[:]) {
		t.Fatalf("gateway keys %+v", pk.Keys)
	}
	res := l.verifyAudit()
	if res.Entries < 14 {
		t.Fatalf("audit has %d entries", res.Entries)
	}
	raw := readFile(t, l.audit)
	if strings.Contains(raw, fmtHex(want[:])[:16]) || strings.Contains(raw, fmtHex(ek[:])[:16]) {
		t.Fatal("key bytes in the audit log")
	}
}

// TestLeastPrivilege is the matrix: every role against every key RPC,
// inside and outside policy.
func TestLeastPrivilege(t *testing.T) {
	l := newLab(t)
	setup(t, l)
	ctx := context.Background()
	type call struct {
		name string
		do   func(c client) error
	}
	serverKeys := call{"GetServerKeys", func(c client) error { _, err := c.GetServerKeys(ctx, &api.GetServerKeysRequest{}); return err }}
	pairsAll := call{"GetPairKeys(all)", func(c client) error { _, err := c.GetPairKeys(ctx, &api.GetPairKeysRequest{}); return err }}
	pairIn := call{"GetPairKeys(3-7)", func(c client) error {
		_, err := c.GetPairKeys(ctx, &api.GetPairKeysRequest{Pairs: []*api.Pair{{A: 3, B: 7}}})
		return err
	}}
	pairOut := call{"GetPairKeys(3-9)", func(c client) error {
		_, err := c.GetPairKeys(ctx, &api.GetPairKeysRequest{Pairs: []*api.Pair{{A: 3, B: 9}}})
		return err
	}}
	dkxIn := call{"AuthorizeDKX(gw,3-7)", func(c client) error {
		a, err := c.AuthorizeDirectKeyExchange(ctx, &api.AuthorizeDirectKeyExchangeRequest{Gateway: "gw", Enclave: 3, Peer: 7})
		if err == nil && !a.Allowed {
			return status.Error(codes.PermissionDenied, a.Reason)
		}
		return err
	}}
	dkxOut := call{"AuthorizeDKX(gw,3-9)", func(c client) error {
		a, err := c.AuthorizeDirectKeyExchange(ctx, &api.AuthorizeDirectKeyExchangeRequest{Gateway: "gw", Enclave: 3, Peer: 9})
		if err == nil && !a.Allowed {
			return status.Error(codes.PermissionDenied, a.Reason)
		}
		return err
	}}
	admin := call{"AddEnclave", func(c client) error {
		_, err := c.AddEnclave(ctx, &api.AddEnclaveRequest{Id: 50, Name: "x" + time.Now().Format("150405.000000000")})
		return err
	}}
	watch := call{"WatchGenerations", func(c client) error {
		ctx, cancel := context.WithCancel(ctx)
		defer cancel()
		stream, err := c.WatchGenerations(ctx, &api.WatchGenerationsRequest{})
		if err != nil {
			return err
		}
		_, err = stream.Recv()
		return err
	}}
	statusCall := call{"Status", func(c client) error { _, err := c.Status(ctx, &api.StatusRequest{}); return err }}
	calls := []call{serverKeys, pairsAll, pairIn, pairOut, dkxIn, dkxOut, admin, watch, statusCall}
	// allowed[role][call]
	allowed := map[string]map[string]bool{
		"admin":   {"AddEnclave": true, "Status": true},
		"server":  {"GetServerKeys": true, "AuthorizeDKX(gw,3-7)": true, "WatchGenerations": true},
		"server2": {"GetServerKeys": true, "AuthorizeDKX(gw,3-7)": true, "WatchGenerations": true},
		"client":  {"WatchGenerations": true}, // revocations only
		"gateway": {"GetPairKeys(all)": true, "GetPairKeys(3-7)": true, "WatchGenerations": true},
		"monitor": {"GetPairKeys(all)": true, "GetPairKeys(3-7)": true, "WatchGenerations": true},
		"encks":   {"GetPairKeys(all)": true, "GetPairKeys(3-7)": true, "AuthorizeDKX(gw,3-7)": true, "WatchGenerations": true},
	}
	ids := map[string]ca.Identity{"admin": idAdmin, "server": idServer, "server2": idServer2, "client": idClient, "gateway": idGateway, "monitor": idMonitor, "encks": idEncKS}
	for role, id := range ids {
		c := l.client(id)
		for _, cl := range calls {
			err := cl.do(c)
			want := allowed[role][cl.name]
			if want && err != nil {
				t.Errorf("%s %s: refused: %v", role, cl.name, err)
			}
			if !want && status.Code(err) != codes.PermissionDenied {
				t.Errorf("%s %s: %v, want PermissionDenied", role, cl.name, err)
			}
			if !want && err != nil && status.Convert(err).Message() == "" {
				t.Errorf("%s %s: refusal without a reason", role, cl.name)
			}
		}
	}
	// Every admin RPC: only an admin gets past authorisation (the admin's
	// requests here are harmless or invalid, so they may fail otherwise).
	adminRPCs := map[string]func(c client) error{
		"AddDevice": func(c client) error {
			_, err := c.AddDevice(ctx, &api.AddDeviceRequest{Name: "x", Role: "root"})
			return err
		},
		"RevokeDevice": func(c client) error {
			_, err := c.RevokeDevice(ctx, &api.RevokeDeviceRequest{Name: "nobody"})
			return err
		},
		"AllowPair": func(c client) error { _, err := c.AllowPair(ctx, &api.AllowPairRequest{A: 3, B: 7}); return err },
		"AddGrant":  func(c client) error { _, err := c.AddGrant(ctx, &api.AddGrantRequest{Device: "nobody"}); return err },
		"RevokeGrant": func(c client) error {
			_, err := c.RevokeGrant(ctx, &api.RevokeGrantRequest{Device: "nobody"})
			return err
		},
		"Rotate": func(c client) error { _, err := c.Rotate(ctx, &api.RotateRequest{}); return err },
	}
	for role, id := range ids {
		c := l.client(id)
		for name, do := range adminRPCs {
			denied := status.Code(do(c)) == codes.PermissionDenied
			if denied != (role != "admin") {
				t.Errorf("%s %s: denied=%v", role, name, denied)
			}
		}
	}
	l.verifyAudit()
}

func TestRevokedAndForeign(t *testing.T) {
	l := newLab(t)
	admin := setup(t, l)
	ctx := context.Background()
	server := l.client(idServer)
	if _, err := server.GetServerKeys(ctx, &api.GetServerKeysRequest{}); err != nil {
		t.Fatal(err)
	}
	if _, err := admin.RevokeDevice(ctx, &api.RevokeDeviceRequest{Name: "web1"}); err != nil {
		t.Fatal(err)
	}
	_, err := server.GetServerKeys(ctx, &api.GetServerKeysRequest{})
	if status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), "revoked") {
		t.Fatalf("revoked server: %v", err)
	}
	// Unregistered device with a valid certificate.
	if _, err := l.client(ca.Identity{Name: "ghost", Role: ca.RoleServer, Enclave: 3, ServerID: 1, HasServerID: true}).GetServerKeys(ctx, &api.GetServerKeysRequest{}); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("unregistered: %v", err)
	}
	// A certificate whose identity differs from the registry's record.
	if _, err := l.client(ca.Identity{Name: "db1", Role: ca.RoleServer, Enclave: 7, ServerID: 10, HasServerID: true}).GetServerKeys(ctx, &api.GetServerKeysRequest{}); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("mismatched certificate: %v", err)
	}
	// A certificate from another CA never gets through TLS.
	other, err := ca.Init(t.TempDir(), "example.org", t0)
	if err != nil {
		t.Fatal(err)
	}
	foreign := credsFrom(t, other, idServer2, t0)
	foreign.Roots = l.auth.Roots() // it trusts our server, but we do not trust it
	if _, err := l.clientWith(foreign).GetServerKeys(ctx, &api.GetServerKeysRequest{}); status.Code(err) != codes.Unavailable {
		t.Fatalf("foreign CA: %v", err)
	}
	// An expired certificate: the fake clock moves past its validity.
	expired := credsFrom(t, l.auth, idServer2, t0.AddDate(0, 0, -40))
	if _, err := l.clientWith(expired).GetServerKeys(ctx, &api.GetServerKeysRequest{}); err == nil {
		t.Fatal("expired certificate accepted")
	}
	l.verifyAudit()
}

func TestBadAdminRequests(t *testing.T) {
	l := newLab(t)
	admin := setup(t, l)
	ctx := context.Background()
	cases := []struct {
		name string
		err  error
		code codes.Code
	}{
		{"enclave 0", second(admin.AddEnclave(ctx, &api.AddEnclaveRequest{Id: 0, Name: "z"})), codes.InvalidArgument},
		{"enclave 70000", second(admin.AddEnclave(ctx, &api.AddEnclaveRequest{Id: 70000, Name: "z"})), codes.InvalidArgument},
		{"duplicate enclave", second(admin.AddEnclave(ctx, &api.AddEnclaveRequest{Id: 3, Name: "z"})), codes.AlreadyExists},
		{"unknown enclave", second(admin.AddDevice(ctx, &api.AddDeviceRequest{Name: "x", Role: "client", Enclave: 42})), codes.NotFound},
		{"bad role", second(admin.AddDevice(ctx, &api.AddDeviceRequest{Name: "x", Role: "root"})), codes.InvalidArgument},
		{"duplicate server id", second(admin.AddDevice(ctx, &api.AddDeviceRequest{Name: "web2", Role: "server", Enclave: 3, ServerId: u32(258)})), codes.AlreadyExists},
		{"revoke unknown", second(admin.RevokeDevice(ctx, &api.RevokeDeviceRequest{Name: "nobody"})), codes.NotFound},
		{"grant outside policy", second(admin.AddGrant(ctx, &api.AddGrantRequest{Device: "gw", Pairs: []*api.Pair{{A: 3, B: 9}}})), codes.FailedPrecondition},
		{"rotate nothing", second(admin.Rotate(ctx, &api.RotateRequest{})), codes.InvalidArgument},
	}
	for _, c := range cases {
		if status.Code(c.err) != c.code {
			t.Errorf("%s: %v, want %v", c.name, c.err, c.code)
		}
	}
	st, err := admin.Status(ctx, &api.StatusRequest{})
	if err != nil || len(st.Enclaves) != 3 || len(st.Devices) != 6 || len(st.Pairs) != 1 || len(st.Grants) != 2 {
		t.Fatalf("status %v: %+v", err, st)
	}
}

// register adds enclaves, devices and allowed pairs through admin.
func register(t testing.TB, admin client, enclaves []*api.AddEnclaveRequest, devices []*api.AddDeviceRequest, pairs []*api.AllowPairRequest) {
	t.Helper()
	ctx := context.Background()
	for _, e := range enclaves {
		if _, err := admin.AddEnclave(ctx, e); err != nil {
			t.Fatalf("enclave %v: %v", e, err)
		}
	}
	for _, d := range devices {
		if _, err := admin.AddDevice(ctx, d); err != nil {
			t.Fatalf("device %v: %v", d, err)
		}
	}
	for _, p := range pairs {
		if _, err := admin.AllowPair(ctx, p); err != nil {
			t.Fatalf("pair %v: %v", p, err)
		}
	}
}

func second[T any](_ T, err error) error { return err }

// TestRotationAndWatch: events rotate pairs (delayed within grace), the
// scheduler carries them out on the fake clock, and watchers hear at once.
func TestRotationAndWatch(t *testing.T) {
	eachTransport(t, func(t *testing.T, lean bool) {
		l := newLab(t)
		l.lean = lean
		admin := setup(t, l)
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		stream, err := l.client(idGateway).WatchGenerations(ctx, &api.WatchGenerationsRequest{})
		if err != nil {
			t.Fatal(err)
		}
		ev, err := stream.Recv()
		if err != nil || ev.Kind != api.GenerationEvent_SNAPSHOT || ev.Pair.A != 3 || ev.Pair.B != 7 || ev.Generation != 1 {
			t.Fatalf("snapshot: %+v %v", ev, err)
		}
		if ev, err := stream.Recv(); err != nil || ev.Kind != api.GenerationEvent_SNAPSHOT_DONE {
			t.Fatalf("snapshot done: %+v %v", ev, err)
		}
		// Within grace of the pair's start: the rotation is delayed.
		r, err := admin.Rotate(ctx, &api.RotateRequest{Pair: &api.Pair{A: 3, B: 7}})
		if err != nil || r.Rotations[0].Outcome != "delayed" {
			t.Fatalf("rotate: %+v %v", r, err)
		}
		l.clock.Advance(2 * time.Hour)
		ev, err = stream.Recv()
		if err != nil || ev.Kind != api.GenerationEvent_ROTATED || ev.Generation != 2 {
			t.Fatalf("rotation event: %+v %v", ev, err)
		}
		// Now both generations are served, the previous one until grace ends.
		sk, err := l.client(idServer).GetServerKeys(ctx, &api.GetServerKeysRequest{})
		if err != nil || len(sk.Keys) != 2 {
			t.Fatalf("keys during grace: %v %d", err, len(sk.Keys))
		}
		// Scheduled rotation a day later.
		l.clock.Advance(25 * time.Hour)
		ev, err = stream.Recv()
		if err != nil || ev.Generation != 3 || ev.Reason != "scheduled" {
			t.Fatalf("scheduled rotation: %+v %v", ev, err)
		}
		// Revoking the gateway ends its stream.
		if _, err := admin.RevokeDevice(ctx, &api.RevokeDeviceRequest{Name: "gw"}); err != nil {
			t.Fatal(err)
		}
		for {
			ev, err = stream.Recv()
			if err != nil {
				break
			}
			if ev.Kind == api.GenerationEvent_REVOKED {
				continue
			}
		}
		if err == io.EOF || status.Code(err) != codes.PermissionDenied {
			t.Fatalf("stream after revocation: %v", err)
		}
		l.verifyAudit()
	})
}

// TestLeaseSPIs: a server leases ranges of its current key's SPI counter,
// one after the other, each audited; other roles, other generations and
// pairs its enclave may not use are refused.
func TestLeaseSPIs(t *testing.T) {
	l := newLab(t)
	setup(t, l)
	ctx := context.Background()
	srv := l.client(idServer)
	var next uint64
	for range 3 {
		r, err := srv.LeaseSPIs(ctx, &api.LeaseSPIsRequest{Peer: 7, Generation: 1, Count: 1000})
		if err != nil {
			t.Fatal(err)
		}
		if r.Enclave != 3 || r.Peer != 7 || r.Server != 258 || r.Generation != 1 || r.First != next || r.Count != 1000 {
			t.Fatalf("lease %+v, want first %d", r, next)
		}
		next += 1000
	}
	for _, c := range []struct {
		name string
		cl   client
		req  *api.LeaseSPIsRequest
		code codes.Code
	}{
		{"client", l.client(idClient), &api.LeaseSPIsRequest{Peer: 7, Generation: 1, Count: 10}, codes.PermissionDenied},
		{"gateway", l.client(idGateway), &api.LeaseSPIsRequest{Peer: 7, Generation: 1, Count: 10}, codes.PermissionDenied},
		{"old generation", srv, &api.LeaseSPIsRequest{Peer: 7, Generation: 2, Count: 10}, codes.InvalidArgument},
		{"pair not allowed", srv, &api.LeaseSPIsRequest{Peer: 9, Generation: 1, Count: 10}, codes.FailedPrecondition},
		{"enclave 0", srv, &api.LeaseSPIsRequest{Peer: 0, Generation: 1, Count: 10}, codes.InvalidArgument},
		{"too many", srv, &api.LeaseSPIsRequest{Peer: 7, Generation: 1, Count: 1 << 30}, codes.InvalidArgument},
	} {
		if _, err := c.cl.LeaseSPIs(ctx, c.req); status.Code(err) != c.code {
			t.Errorf("%s: %v, want %v", c.name, err, c.code)
		}
	}
	if raw := readFile(t, l.audit); strings.Count(raw, `"rpc":"LeaseSPIs"`) < 9 || !strings.Contains(raw, "SPI counter values 2000 to 2999") {
		t.Fatal("leases and refusals are not in the audit log")
	}
}

// TestClientWatchesRevocations: a client's watch carries the revoked
// devices and nothing of the pairs: the snapshot of revocations, its end,
// then each revocation as it happens.
func TestClientWatchesRevocations(t *testing.T) {
	eachTransport(t, func(t *testing.T, lean bool) {
		l := newLab(t)
		l.lean = lean
		admin := setup(t, l)
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		if _, err := admin.RevokeDevice(ctx, &api.RevokeDeviceRequest{Name: "db1"}); err != nil {
			t.Fatal(err)
		}
		stream, err := l.client(idClient).WatchGenerations(ctx, &api.WatchGenerationsRequest{})
		if err != nil {
			t.Fatal(err)
		}
		var kinds []api.GenerationEvent_Kind
		for {
			ev, err := stream.Recv()
			if err != nil {
				t.Fatal(err)
			}
			kinds = append(kinds, ev.Kind)
			if ev.Kind == api.GenerationEvent_SNAPSHOT_DONE {
				break
			}
			if ev.Kind != api.GenerationEvent_DEVICE_REVOKED || ev.Device != "db1" {
				t.Fatalf("a client's snapshot holds %+v", ev)
			}
		}
		if len(kinds) != 2 {
			t.Fatalf("snapshot %v", kinds)
		}
		if _, err := admin.RevokeDevice(ctx, &api.RevokeDeviceRequest{Name: "web1"}); err != nil {
			t.Fatal(err)
		}
		if ev, err := stream.Recv(); err != nil || ev.Kind != api.GenerationEvent_DEVICE_REVOKED || ev.Device != "web1" {
			t.Fatalf("revocation: %+v %v", ev, err)
		}
	})
}
