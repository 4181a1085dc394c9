package keyserver

import (
	"context"
	"crypto/ed25519"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"path/filepath"
	"strings"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"

	"github.com/enclavekeys/enclave/internal/api"
	"github.com/enclavekeys/enclave/internal/ca"
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
	if _, err := enroll.Join(ctx, &api.JoinRequest{Token: tok.GetToken(), Csr: csr}); status.Code(err) != codes.NotFound {
		t.Fatalf("a token used twice: %v", err)
	}
	if _, err := api.NewAdminClient(conn).Status(ctx, &api.StatusRequest{}); status.Code(err) != codes.Unauthenticated {
		t.Fatalf("status without a certificate: %v", err)
	}
	if _, err := api.NewKeyServiceClient(conn).GetServerKeys(ctx, &api.GetServerKeysRequest{}); status.Code(err) != codes.Unauthenticated {
		t.Fatalf("server keys without a certificate: %v", err)
	}
	// The new certificate works with the key service at once.
	pair, err := tls.X509KeyPair(reply.GetCertificatePem(), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: mustPKCS8(t, priv)}))
	if err != nil {
		t.Fatal(err)
	}
	web2 := l.clientWith(&Credentials{Roots: l.auth.Roots(), Cert: pair})
	if _, err := web2.GetServerKeys(ctx, &api.GetServerKeysRequest{}); err != nil {
		t.Fatalf("the joined server fetching its keys: %v", err)
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

// TestRevokeBeforeJoin: revoking a device that has a token and has not
// joined yet withdraws the token.
func TestRevokeBeforeJoin(t *testing.T) {
	l := issuingLab(t)
	admin := l.client(ca.Identity{Name: "alice", Role: ca.RoleAdmin})
	ctx := context.Background()
	admin.AddEnclave(ctx, &api.AddEnclaveRequest{Id: 7, Name: "db"})
	tok, err := admin.CreateJoinToken(ctx, &api.CreateJoinTokenRequest{Name: "phone", Role: "client", Enclave: 7, Overlay: "100.64.7.9/16"})
	if err != nil {
		t.Fatal(err)
	}
	r, err := admin.RevokeDevice(ctx, &api.RevokeDeviceRequest{Name: "phone"})
	if err != nil || !strings.Contains(r.GetMessage(), "withdrawn") {
		t.Fatalf("revoke: %v %v", r, err)
	}
	_, csr := csrFor(t)
	if _, err := api.NewEnrollClient(l.anonymous()).Join(ctx, &api.JoinRequest{Token: tok.GetToken(), Csr: csr}); status.Code(err) != codes.NotFound {
		t.Fatalf("a withdrawn token: %v", err)
	}
}
