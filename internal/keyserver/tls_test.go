package keyserver

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net"
	"net/url"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"

	"github.com/enclavekeys/enclave/internal/api"
	"github.com/enclavekeys/enclave/internal/audit"
	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/store"
)

// forgedServerCreds are credentials for id with an IP SAN for 127.0.0.1,
// signed by the org CA directly: what `cert issue --host` no longer makes
// for a role that does not serve, but an older certificate or another tool
// might.
func forgedServerCreds(t *testing.T, auth *ca.Authority, id ca.Identity) *Credentials {
	t.Helper()
	pub, priv, _ := ed25519.GenerateKey(rand.Reader)
	id.Org = auth.Org
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(99),
		Subject:      pkix.Name{CommonName: id.Name},
		NotBefore:    t0.Add(-time.Hour),
		NotAfter:     t0.Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth},
		URIs:         []*url.URL{id.URI()},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, auth.Cert, pub, auth.Key)
	if err != nil {
		t.Fatal(err)
	}
	leaf, _ := x509.ParseCertificate(der)
	return &Credentials{Roots: auth.Roots(), Cert: tls.Certificate{Certificate: [][]byte{der}, PrivateKey: priv, Leaf: leaf}}
}

// TestClientsRequireKeyserverRole: a server presenting a certificate of the
// org that is not a key server's is refused by every client before any
// request is sent (it could otherwise plant keys or fake admin answers).
func TestClientsRequireKeyserverRole(t *testing.T) {
	l := newLab(t)
	for _, role := range []ca.Identity{
		{Name: "laptop", Role: ca.RoleClient},
		{Name: "gw", Role: ca.RoleGateway},
		{Name: "alice", Role: ca.RoleAdmin},
		{Name: "web1", Role: ca.RoleServer, Enclave: 3, ServerID: 258, HasServerID: true},
	} {
		fake := startLabAs(t, l.auth, l.clock, openStore(t), openAudit(t), nil, forgedServerCreds(t, l.auth, role))
		web := fake.client(ca.Identity{Name: "web1", Role: ca.RoleServer, Enclave: 3, ServerID: 258, HasServerID: true})
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_, err := web.GetServerKeys(ctx, &api.GetServerKeysRequest{})
		cancel()
		if err == nil || !strings.Contains(err.Error(), "not a key server") {
			t.Errorf("a %s posing as the key server: %v, want a refused connection", role.Role, err)
		}
		admin := fake.client(ca.Identity{Name: "alice", Role: ca.RoleAdmin})
		ctx, cancel = context.WithTimeout(context.Background(), 5*time.Second)
		_, err = admin.RevokeDevice(ctx, &api.RevokeDeviceRequest{Name: "web1"})
		cancel()
		if err == nil || !strings.Contains(err.Error(), "not a key server") {
			t.Errorf("admin against a %s: %v", role.Role, err)
		}
	}
	// The real key server still answers.
	admin := l.client(ca.Identity{Name: "alice", Role: ca.RoleAdmin})
	if _, err := admin.Status(context.Background(), &api.StatusRequest{}); err != nil {
		t.Fatal(err)
	}
}

func openStore(t *testing.T) *store.Bolt {
	t.Helper()
	st, err := store.OpenBolt(filepath.Join(t.TempDir(), "enclave.db"), testKEK(t))
	if err != nil {
		t.Fatal(err)
	}
	return st
}

func openAudit(t *testing.T) *audit.Log {
	t.Helper()
	al, err := audit.Open(filepath.Join(t.TempDir(), "audit.log"), nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	return al
}

// TestDialReplicas: with several addresses, a client uses one that answers
// (the first is down here), each checked against its own host's name.
func TestDialReplicas(t *testing.T) {
	l := newLab(t)
	setup(t, l)
	dead, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	deadAddr := dead.Addr().String()
	dead.Close()
	conn, err := Dial(deadAddr+","+l.addr, "", l.creds(idServer))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if _, err := api.NewKeyServiceClient(conn).GetServerKeys(ctx, &api.GetServerKeysRequest{}, grpc.WaitForReady(true)); err != nil {
		t.Fatalf("through the second replica: %v", err)
	}
	if _, err := Dial("127.0.0.1:1,nonsense", "", l.creds(idServer)); err == nil {
		t.Fatal("a malformed address list was taken")
	}
}
