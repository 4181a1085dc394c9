package keyserver

import (
	"context"
	"crypto/ed25519"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"github.com/enclavekeys/enclave/internal/api"
	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/keyclient"
)

// issuingLab is a lab whose key service has an issuing CA.
func issuingLab(t *testing.T) *lab {
	return newLabWith(t, func(c *Config, auth *ca.Authority) {
		is, err := auth.IssueIssuer("ks", 365, t0)
		if err != nil {
			t.Fatal(err)
		}
		dir := t.TempDir()
		if err := is.WriteFiles(dir, "issuer"); err != nil {
			t.Fatal(err)
		}
		if c.Issuer, err = ca.LoadIssuer(filepath.Join(dir, "issuer.crt"), filepath.Join(dir, "issuer.key")); err != nil {
			t.Fatal(err)
		}
	})
}

// anonymous dials the key service without a client certificate, as a
// joining host does.
func (l *lab) anonymous() *grpc.ClientConn {
	l.t.Helper()
	cfg := &tls.Config{MinVersion: tls.VersionTLS13, RootCAs: l.auth.Roots().Pool(), ServerName: "127.0.0.1"}
	conn, err := grpc.NewClient(l.addr, grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
	if err != nil {
		l.t.Fatal(err)
	}
	l.t.Cleanup(func() { conn.Close() })
	return conn
}

func csrFor(t *testing.T) (ed25519.PrivateKey, []byte) {
	priv, der, err := ca.NewKeyRequest()
	if err != nil {
		t.Fatal(err)
	}
	return priv, der
}

// TestJoin: an admin makes a token; a host without a certificate joins
// with it and a key it made, and gets a certificate of the issuing CA for
// exactly the token's identity, with the device registered; the token
// works once; without a certificate nothing else is served.
func TestJoin(t *testing.T) {
	l := issuingLab(t)
	admin := l.client(ca.Identity{Name: "alice", Role: ca.RoleAdmin})
	ctx := context.Background()
	if _, err := admin.AddEnclave(ctx, &api.AddEnclaveRequest{Id: 3, Name: "web"}); err != nil {
		t.Fatal(err)
	}
	k := uint32(302)
	tok, err := admin.CreateJoinToken(ctx, &api.CreateJoinTokenRequest{Name: "web2", Role: "server", Enclave: 3, ServerId: &k, Overlay: "100.64.3.3/16"})
	if err != nil || !strings.HasPrefix(tok.GetToken(), tokenPrefix) {
		t.Fatalf("token: %v %v", tok, err)
	}
	conn := l.anonymous()
	enroll := api.NewEnrollClient(conn)
	priv, csr := csrFor(t)
	reply, err := enroll.Join(ctx, &api.JoinRequest{Token: tok.GetToken(), Csr: csr})
	if err != nil {
		t.Fatalf("join: %v", err)
	}
	chain, err := ca.ParsePEMCerts(reply.GetCertificatePem())
	if err != nil {
		t.Fatal(err)
	}
	id, err := l.auth.Roots().VerifyChain(chain, t0)
	if err != nil || id.Name != "web2" || id.ServerID != 302 || id.Overlay.String() != "100.64.3.3/16" || !chain[0].PublicKey.(ed25519.PublicKey).Equal(priv.Public()) {
		t.Fatalf("the certificate: %+v %v", id, err)
	}
	st, _ := admin.Status(ctx, &api.StatusRequest{})
	found := false
	for _, d := range st.GetDevices() {
		found = found || d.GetName() == "web2" && d.GetServerId() == 302
	}
	if !found {
		t.Fatal("the joined device is not registered")
	}
	// The answer was lost: the same token and request get a certificate
	// again; another key gets nothing from the token.
	again, err := enroll.Join(ctx, &api.JoinRequest{Token: tok.GetToken(), Csr: csr})
	if err != nil {
		t.Fatalf("the same token and request again: %v", err)
	}
	if c, _ := ca.ParsePEMCerts(again.GetCertificatePem()); len(c) == 0 || !c[0].PublicKey.(ed25519.PublicKey).Equal(priv.Public()) {
		t.Fatal("the second answer is not for the same key")
	}
	if _, other := csrFor(t); true {
		if _, err := enroll.Join(ctx, &api.JoinRequest{Token: tok.GetToken(), Csr: other}); status.Code(err) != codes.PermissionDenied {
			t.Fatalf("the token with another key: %v", err)
		}
	}
	if _, err := api.NewAdminClient(conn).Status(ctx, &api.StatusRequest{}); status.Code(err) != codes.Unauthenticated {
		t.Fatalf("status without a certificate: %v", err)
	}
	if _, err := api.NewKeyServiceClient(conn).GetServerKeys(ctx, &api.GetServerKeysRequest{}); status.Code(err) != codes.Unauthenticated {
		t.Fatalf("server keys without a certificate: %v", err)
	}
	// The device is pinned to the certificate answered last: the first
	// answer's is refused from now on.
	first, err := tls.X509KeyPair(reply.GetCertificatePem(), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: mustPKCS8(t, priv)}))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := api.NewEnrollClient(l.connWith(&Credentials{Roots: l.auth.Roots(), Cert: first})).ConfirmJoin(ctx, &api.ConfirmJoinRequest{}); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("a confirmation with an earlier answer's certificate: %v", err)
	}
	// The last answer's certificate works with the key service at once.
	pair, err := tls.X509KeyPair(again.GetCertificatePem(), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: mustPKCS8(t, priv)}))
	if err != nil {
		t.Fatal(err)
	}
	creds := &Credentials{Roots: l.auth.Roots(), Cert: pair}
	web2 := l.clientWith(creds)
	// Pending until its host confirms with it: nothing else is served.
	if _, err := web2.GetServerKeys(ctx, &api.GetServerKeysRequest{}); status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), "not confirmed") {
		t.Fatalf("a pending server fetching its keys: %v", err)
	}
	confirm := api.NewEnrollClient(l.connWith(creds))
	if r, err := confirm.ConfirmJoin(ctx, &api.ConfirmJoinRequest{}); err != nil || !r.GetWasPending() {
		t.Fatalf("confirm: %v %v", r, err)
	}
	if r, err := confirm.ConfirmJoin(ctx, &api.ConfirmJoinRequest{}); err != nil || r.GetWasPending() {
		t.Fatalf("confirm again: %v %v", r, err)
	}
	if _, err := web2.GetServerKeys(ctx, &api.GetServerKeysRequest{}); err != nil {
		t.Fatalf("the joined server fetching its keys: %v", err)
	}
	if _, err := enroll.Join(ctx, &api.JoinRequest{Token: tok.GetToken(), Csr: csr}); status.Code(err) != codes.NotFound {
		t.Fatalf("a token used after its join was confirmed: %v", err)
	}
}

// TestJoinIssuerBehindRollover (issue 32, blocker 4): after a CA rollover
// the key service trusts only the new CA while its issuing CA is still
// the old one's. A join is refused, saying so, and uses nothing up: once
// the key service has an issuer it trusts again (SetTrust, which SIGHUP
// calls), the same token joins. Before, the join burnt the token and
// left the device registered with a certificate the host refused.
func TestJoinIssuerBehindRollover(t *testing.T) {
	l := issuingLab(t)
	admin := l.client(ca.Identity{Name: "alice", Role: ca.RoleAdmin})
	ctx := context.Background()
	tok := clientToken(t, admin, "desk", "100.64.7.3/16")
	ca2, err := ca.Init(filepath.Join(t.TempDir(), "ca2"), "example.org", t0)
	if err != nil {
		t.Fatal(err)
	}
	old := l.svc.roots.Load()
	issuer := l.svc.issuer.Load()
	if err := l.svc.SetTrust(ca2.Roots(), issuer); err != nil {
		t.Fatal(err)
	}
	enroll := api.NewEnrollClient(l.anonymous())
	_, csr := csrFor(t)
	_, err = enroll.Join(ctx, &api.JoinRequest{Token: tok.GetToken(), Csr: csr})
	if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "issuing CA") {
		t.Fatalf("a join through an issuer the key service no longer trusts: %v", err)
	}
	st, _ := admin.Status(ctx, &api.StatusRequest{})
	for _, d := range st.GetDevices() {
		if d.GetName() == "desk" {
			t.Fatalf("the refused join registered its device: %v", d)
		}
	}
	if err := l.svc.SetTrust(old, issuer); err != nil {
		t.Fatal(err)
	}
	if _, err := enroll.Join(ctx, &api.JoinRequest{Token: tok.GetToken(), Csr: csr}); err != nil {
		t.Fatalf("the same token once the issuer is trusted again: %v", err)
	}
}

func mustPKCS8(t *testing.T, k ed25519.PrivateKey) []byte {
	b, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestJoinRefusals: tokens for roles that cannot join, bad requests, and
// a key service without an issuing CA are refused with what to do.
func TestJoinRefusals(t *testing.T) {
	l := issuingLab(t)
	admin := l.client(ca.Identity{Name: "alice", Role: ca.RoleAdmin})
	ctx := context.Background()
	admin.AddEnclave(ctx, &api.AddEnclaveRequest{Id: 7, Name: "db"})
	if _, err := admin.CreateJoinToken(ctx, &api.CreateJoinTokenRequest{Name: "eve", Role: "admin"}); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("an admin token: %v", err)
	}
	if _, err := admin.CreateJoinToken(ctx, &api.CreateJoinTokenRequest{Name: "x", Role: "client", Enclave: 7, TtlSeconds: 30 * 24 * 3600}); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("a month-long token: %v", err)
	}
	laptop := l.client(ca.Identity{Name: "laptop", Role: ca.RoleClient, Enclave: 7})
	if _, err := laptop.CreateJoinToken(ctx, &api.CreateJoinTokenRequest{Name: "x", Role: "client", Enclave: 7}); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("a token from a non-admin: %v", err)
	}
	enroll := api.NewEnrollClient(l.anonymous())
	_, csr := csrFor(t)
	for _, c := range []struct {
		req  *api.JoinRequest
		code codes.Code
	}{
		{&api.JoinRequest{Token: "hello", Csr: csr}, codes.InvalidArgument},
		{&api.JoinRequest{Token: tokenPrefix + "nope", Csr: csr}, codes.NotFound},
		{&api.JoinRequest{Token: tokenPrefix + "nope", Csr: []byte("junk")}, codes.InvalidArgument},
	} {
		if _, err := enroll.Join(ctx, c.req); status.Code(err) != c.code {
			t.Errorf("%q: %v, want %v", c.req.GetToken(), err, c.code)
		}
	}
	plain := newLab(t)
	if _, err := api.NewEnrollClient(plain.anonymous()).Join(ctx, &api.JoinRequest{Token: tokenPrefix + "x", Csr: csr}); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("a key service without an issuing CA: %v", err)
	}
}

// TestJoinThrottledBySource (issue 31): refused joins are charged to
// their source host (IPv4, or IPv6 /64, never with the port): a source
// that keeps failing is throttled, others are not; each refusal the log
// records names its source; and past one budget for all sources, more
// sources make no more lines, only a summary.
func TestJoinThrottledBySource(t *testing.T) {
	l := issuingLab(t)
	_, csr := csrFor(t)
	bad := &api.JoinRequest{Token: tokenPrefix + "nope", Csr: csr}
	from := func(addr string) context.Context {
		return peer.NewContext(context.Background(), &peer.Peer{Addr: net.TCPAddrFromAddrPort(netip.MustParseAddrPort(addr))})
	}
	try := func(addr string) codes.Code {
		_, err := l.svc.Join(from(addr), bad)
		return status.Code(err)
	}
	notFound, throttled := tally(t, 45, codes.NotFound, func(i int) codes.Code {
		return try(fmt.Sprintf("192.0.2.7:%d", 40000+i)) // a new port each time
	})
	if notFound != refusalBurst || throttled != 45-refusalBurst {
		t.Fatalf("45 bad joins from one host: %d refused, %d throttled; want %d and %d", notFound, throttled, refusalBurst, 45-refusalBurst)
	}
	if c := try("198.51.100.9:5000"); c != codes.NotFound {
		t.Fatalf("another host, throttled with the first: %v", c)
	}
	// One IPv6 /64 is one source, whatever its addresses and ports. (Time
	// passes first, so that the shared budget of all sources' audit lines,
	// spent above, is whole again.)
	l.clock.Advance(30 * time.Second)
	for i := range refusalBurst {
		if c := try(fmt.Sprintf("[2001:db8::%x]:%d", i+1, 6000+i)); c != codes.NotFound {
			t.Fatalf("IPv6 join %d: %v", i, c)
		}
	}
	if c := try("[2001:db8::ffff]:7000"); c != codes.ResourceExhausted {
		t.Fatalf("the /64 past its budget: %v", c)
	}
	if c := try("[2001:db8:0:1::1]:7000"); c != codes.NotFound {
		t.Fatalf("another /64: %v", c)
	}
	// The log names the sources of the refusals it records; one host's
	// refusals beyond the budget are summarised under its own name.
	raw := readFile(t, l.audit)
	if !strings.Contains(raw, `"source":"192.0.2.7"`) || !strings.Contains(raw, `"source":"2001:db8::1"`) {
		t.Fatalf("refused joins name no source:\n%s", raw)
	}

	// Many sources, one refusal each: after the shared budget, no line
	// per source.
	before := strings.Count(readFile(t, l.audit), "\n")
	for i := range 200 {
		try(fmt.Sprintf("203.0.113.%d:1000", i))
	}
	if lines := strings.Count(readFile(t, l.audit), "\n") - before; lines > refusalBurst {
		t.Fatalf("200 sources wrote %d audit lines, want at most %d", lines, refusalBurst)
	}
	l.svc.flushRefusals()
	if raw := readFile(t, l.audit); !strings.Contains(raw, `"caller":"join:*"`) {
		t.Fatalf("no summary of the sources' refusals:\n%s", raw)
	}
	// Many sources past their own budgets, flush after flush: one summary
	// line a flush for all of them (the review: 500 sources made 1,523
	// lines in 3 flushes).
	for round := range 3 {
		before := strings.Count(readFile(t, l.audit), "\n")
		for i := range 200 {
			for range refusalBurst + 2 {
				try(fmt.Sprintf("[2001:db8:%x:%x::1]:1000", round+10, i))
			}
		}
		l.svc.flushRefusals()
		if lines := strings.Count(readFile(t, l.audit), "\n") - before; lines > refusalBurst+1 {
			t.Fatalf("200 sources over their budgets wrote %d audit lines in one flush", lines)
		}
		l.clock.Advance(time.Second)
	}
	l.verifyAudit()
}

// TestRevokeBeforeJoin: revoking a device that has a token and has not
// joined yet withdraws the token.
func TestRevokeBeforeJoin(t *testing.T) {
	l := issuingLab(t)
	admin := l.client(ca.Identity{Name: "alice", Role: ca.RoleAdmin})
	ctx := context.Background()
	tok := clientToken(t, admin, "phone", "100.64.7.9/16")
	r, err := admin.RevokeDevice(ctx, &api.RevokeDeviceRequest{Name: "phone"})
	if err != nil || !strings.Contains(r.GetMessage(), "withdrawn") {
		t.Fatalf("revoke: %v %v", r, err)
	}
	_, csr := csrFor(t)
	if _, err := api.NewEnrollClient(l.anonymous()).Join(ctx, &api.JoinRequest{Token: tok.GetToken(), Csr: csr}); status.Code(err) != codes.NotFound {
		t.Fatalf("a withdrawn token: %v", err)
	}
}

// TestRenew (issue 32): a joined device renews with the key service: a
// certificate of the issuing CA for exactly its identity, for a key it
// made, audited; admins (the org CA's), pending and revoked devices get
// nothing.
func TestRenew(t *testing.T) {
	l := issuingLab(t)
	admin := l.client(ca.Identity{Name: "alice", Role: ca.RoleAdmin})
	ctx := context.Background()
	tok := clientToken(t, admin, "desk", "100.64.7.4/16")
	desk := l.joinWith(tok.GetToken())
	enroll := api.NewEnrollClient(l.connWith(desk))
	_, csr := csrFor(t)
	if _, err := enroll.Renew(ctx, &api.RenewRequest{Csr: csr}); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("a pending device renewing: %v", err)
	}
	if _, err := enroll.ConfirmJoin(ctx, &api.ConfirmJoinRequest{}); err != nil {
		t.Fatal(err)
	}
	old, _ := desk.Identity(t0)
	r, err := keyclient.Renew(ctx, enroll, l.auth.Roots(), old, l.clock.Now())
	if err != nil {
		t.Fatalf("renew: %v", err)
	}
	if r.ID != old || r.Cert.PublicKey.(ed25519.PublicKey).Equal(desk.Cert.Leaf.PublicKey) {
		t.Fatalf("the renewed certificate: %v, same key %v", r.ID, r.Cert.PublicKey.(ed25519.PublicKey).Equal(desk.Cert.Leaf.PublicKey))
	}
	if _, err := api.NewEnrollClient(l.connWith(l.creds(ca.Identity{Name: "alice", Role: ca.RoleAdmin}))).Renew(ctx, &api.RenewRequest{Csr: csr}); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("an admin renewing with the key service: %v", err)
	}
	if _, err := admin.RevokeDevice(ctx, &api.RevokeDeviceRequest{Name: "desk"}); err != nil {
		t.Fatal(err)
	}
	if _, err := enroll.Renew(ctx, &api.RenewRequest{Csr: csr}); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("a revoked device renewing: %v", err)
	}
	if b, _ := os.ReadFile(l.audit); !strings.Contains(string(b), "renewed its certificate") {
		t.Fatalf("the renewal is not in the audit log:\n%s", b)
	}
}

// TestStolenTokenAfterRetoken (issue 32, attacker review): a thief joins
// first with a stolen token; the admin makes a new token for the pending
// name and the real host joins with it. The thief's certificate can
// neither confirm the real host's join nor, after it, get anything from
// the key service (the device is pinned to the real host's certificate).
func TestStolenTokenAfterRetoken(t *testing.T) {
	l := issuingLab(t)
	admin := l.client(ca.Identity{Name: "alice", Role: ca.RoleAdmin})
	ctx := context.Background()
	admin.AddEnclave(ctx, &api.AddEnclaveRequest{Id: 3, Name: "web"})
	k := uint32(5)
	token := func() string {
		tok, err := admin.CreateJoinToken(ctx, &api.CreateJoinTokenRequest{Name: "db1", Role: "server", Enclave: 3, ServerId: &k, Overlay: "100.64.3.5/16"})
		if err != nil {
			t.Fatal(err)
		}
		return tok.GetToken()
	}
	thief := l.joinWith(token())
	real := l.joinWith(token()) // the admin's new token for the pending name
	if _, err := api.NewEnrollClient(l.connWith(thief)).ConfirmJoin(ctx, &api.ConfirmJoinRequest{}); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("the thief confirming the real host's join: %v", err)
	}
	if _, err := api.NewEnrollClient(l.connWith(real)).ConfirmJoin(ctx, &api.ConfirmJoinRequest{}); err != nil {
		t.Fatal(err)
	}
	if _, err := l.clientWith(thief).GetServerKeys(ctx, &api.GetServerKeysRequest{}); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("the thief's certificate after the real join: %v", err)
	}
	_, csr := csrFor(t)
	if _, err := api.NewEnrollClient(l.connWith(thief)).Renew(ctx, &api.RenewRequest{Csr: csr}); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("the thief renewing: %v", err)
	}
	if _, err := l.clientWith(real).GetServerKeys(ctx, &api.GetServerKeysRequest{}); err != nil {
		t.Fatalf("the real host: %v", err)
	}
}

// TestIssuanceBounded (issue 32, attacker review): one device renews at
// most renewsPerHour times an hour, and one token is answered again at
// most joinsPerHour times; past that, ResourceExhausted, and nothing
// issued or written.
func TestIssuanceBounded(t *testing.T) {
	l := issuingLab(t)
	admin := l.client(ca.Identity{Name: "alice", Role: ca.RoleAdmin})
	ctx := context.Background()
	tok := clientToken(t, admin, "desk", "100.64.7.4/16")
	priv, csr := csrFor(t)
	enroll := api.NewEnrollClient(l.anonymous())
	var last *api.JoinReply
	var err error
	for i := 0; i <= joinsPerHour; i++ { // the first answer, then joinsPerHour again
		if last, err = enroll.Join(ctx, &api.JoinRequest{Token: tok.GetToken(), Csr: csr}); err != nil {
			t.Fatalf("join %d: %v", i, err)
		}
	}
	if _, err := enroll.Join(ctx, &api.JoinRequest{Token: tok.GetToken(), Csr: csr}); status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("a token answered once too often: %v", err)
	}
	pair, _ := tls.X509KeyPair(last.GetCertificatePem(), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: mustPKCS8(t, priv)}))
	creds := &Credentials{Roots: l.auth.Roots(), Cert: pair}
	mine := api.NewEnrollClient(l.connWith(creds))
	if _, err := mine.ConfirmJoin(ctx, &api.ConfirmJoinRequest{}); err != nil {
		t.Fatal(err)
	}
	for i := range renewsPerHour {
		_, csr := csrFor(t)
		if _, err := mine.Renew(ctx, &api.RenewRequest{Csr: csr}); err != nil {
			t.Fatalf("renewal %d: %v", i, err)
		}
	}
	_, csr = csrFor(t)
	if _, err := mine.Renew(ctx, &api.RenewRequest{Csr: csr}); status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("a renewal past the bound: %v", err)
	}
	l.clock.Advance(time.Hour + time.Minute)
	if _, err := mine.Renew(ctx, &api.RenewRequest{Csr: csr}); err != nil {
		t.Fatalf("a renewal an hour later: %v", err)
	}
}

// TestRenewMovesPinFromCopies (issue 32, attacker re-check): a copy of a
// device's pair is cut off by the device's renewal once the new
// certificate is used (before, it kept working and could renew itself
// and take the pin); a device that was not pinned is pinned by its first
// renewal, so a copy of its old pair cannot renew itself unseen.
func TestRenewMovesPinFromCopies(t *testing.T) {
	l := issuingLab(t)
	admin := l.client(ca.Identity{Name: "alice", Role: ca.RoleAdmin})
	ctx := context.Background()
	admin.AddEnclave(ctx, &api.AddEnclaveRequest{Id: 7, Name: "db"})
	if _, err := admin.AddDevice(ctx, &api.AddDeviceRequest{Name: "desk", Role: "client", Enclave: 7}); err != nil { // not pinned
		t.Fatal(err)
	}
	id := ca.Identity{Org: "example.org", Name: "desk", Role: ca.RoleClient, Enclave: 7}
	old := l.creds(id) // the device's pair, and the thief's copy of it
	r, err := keyclient.Renew(ctx, api.NewEnrollClient(l.connWith(old)), l.auth.Roots(), func() ca.Identity { i, _ := old.Identity(t0); return i }(), l.clock.Now())
	if err != nil {
		t.Fatal(err)
	}
	pair, err := tls.X509KeyPair(r.CertPEM, r.KeyPEM)
	if err != nil {
		t.Fatal(err)
	}
	renewed := &Credentials{Roots: l.auth.Roots(), Cert: pair}
	// The renewed certificate's first call retires the old one.
	if _, err := api.NewEnrollClient(l.connWith(renewed)).ConfirmJoin(ctx, &api.ConfirmJoinRequest{}); err != nil {
		t.Fatal(err)
	}
	_, csr := csrFor(t)
	if _, err := api.NewEnrollClient(l.connWith(old)).Renew(ctx, &api.RenewRequest{Csr: csr}); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("the copied old pair renewing after the device did: %v", err)
	}
	if _, err := api.NewEnrollClient(l.connWith(old)).ConfirmJoin(ctx, &api.ConfirmJoinRequest{}); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("the copied old pair after the renewed one was used: %v", err)
	}
	if _, err := api.NewEnrollClient(l.connWith(renewed)).Renew(ctx, &api.RenewRequest{Csr: csr}); err != nil {
		t.Fatalf("the device renewing again: %v", err)
	}
}

// TestRetiredCARefusedOnOpenConnections (issue 32, third operator
// review): after the CA bundle changes (a rollover's last step), a
// connection made with a certificate of a CA no longer in it is refused
// at its next call, not only new connections.
func TestRetiredCARefusedOnOpenConnections(t *testing.T) {
	l := issuingLab(t)
	admin := l.client(ca.Identity{Name: "alice", Role: ca.RoleAdmin})
	ctx := context.Background()
	if _, err := admin.Status(ctx, &api.StatusRequest{}); err != nil {
		t.Fatal(err)
	}
	ca2, err := ca.Init(filepath.Join(t.TempDir(), "ca2"), "example.org", t0)
	if err != nil {
		t.Fatal(err)
	}
	old := l.svc.roots.Load()
	if err := l.svc.SetTrust(ca2.Roots(), l.svc.issuer.Load()); err != nil {
		t.Fatal(err)
	}
	if _, err := admin.Status(ctx, &api.StatusRequest{}); status.Code(err) != codes.Unauthenticated {
		t.Fatalf("a call on a connection of the retired CA: %v", err)
	}
	l.svc.SetTrust(old, l.svc.issuer.Load())
	if _, err := admin.Status(ctx, &api.StatusRequest{}); err != nil {
		t.Fatalf("the CA back in the bundle: %v", err)
	}
}

// joinWith joins with token and a key made here, and returns the
// credentials the answer gives (the device pending until it confirms).
func (l *lab) joinWith(token string) *Credentials {
	l.t.Helper()
	priv, csr, err := ca.NewKeyRequest()
	if err != nil {
		l.t.Fatal(err)
	}
	r, err := api.NewEnrollClient(l.anonymous()).Join(context.Background(), &api.JoinRequest{Token: token, Csr: csr})
	if err != nil {
		l.t.Fatal(err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(priv)
	if err != nil {
		l.t.Fatal(err)
	}
	pair, err := tls.X509KeyPair(r.GetCertificatePem(), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}))
	if err != nil {
		l.t.Fatal(err)
	}
	return &Credentials{Roots: l.auth.Roots(), Cert: pair}
}

// clientToken adds enclave 7 and makes a join token for a client of it.
func clientToken(t *testing.T, admin client, name, overlay string) *api.JoinTokenReply {
	t.Helper()
	ctx := context.Background()
	admin.AddEnclave(ctx, &api.AddEnclaveRequest{Id: 7, Name: "db"})
	tok, err := admin.CreateJoinToken(ctx, &api.CreateJoinTokenRequest{Name: name, Role: "client", Enclave: 7, Overlay: overlay})
	if err != nil {
		t.Fatal(err)
	}
	return tok
}
