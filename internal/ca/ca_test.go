package ca

import (
	"crypto/ed25519"
	"crypto/x509"
	"errors"
	"fmt"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

var now = time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)

func newCA(t testing.TB) (*Authority, string) {
	t.Helper()
	dir := t.TempDir()
	a, err := Init(dir, "example.org", now)
	if err != nil {
		t.Fatal(err)
	}
	return a, dir
}

func TestInitAndLoad(t *testing.T) {
	a, dir := newCA(t)
	st, err := os.Stat(filepath.Join(dir, KeyFile))
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("ca.key: %v %v", err, st.Mode())
	}
	b, err := Load(dir)
	if err != nil || b.Org != "example.org" || !b.Cert.Equal(a.Cert) {
		t.Fatalf("Load: %v", err)
	}
	if _, err := Init(dir, "example.org", now); !errors.Is(err, ErrExists) {
		t.Fatalf("second Init: %v", err)
	}
	for _, org := range []string{"Bad Org", ".", "a..b", ".example.org", "example.org.", strings.Repeat("a", 254)} {
		if _, err := Init(t.TempDir(), org, now); !errors.Is(err, ErrOrg) {
			t.Fatalf("org %.40q: %v, want ErrOrg", org, err)
		}
	}
	// A key that is not the CA's is refused.
	_, other := newCA(t)
	os.Remove(filepath.Join(dir, KeyFile))
	k, _ := os.ReadFile(filepath.Join(other, KeyFile))
	os.WriteFile(filepath.Join(dir, KeyFile), k, 0o600)
	if _, err := Load(dir); !errors.Is(err, ErrKeyMatch) {
		t.Fatalf("mismatched key: %v", err)
	}
}

func TestIssueEveryRole(t *testing.T) {
	a, _ := newCA(t)
	cases := []Identity{
		{Name: "web1", Role: RoleServer, Enclave: 3, ServerID: 258, HasServerID: true},
		{Name: "laptop", Role: RoleClient, Enclave: 7},
		{Name: "laptop2", Role: RoleClient},
		{Name: "gw-a", Role: RoleGateway, Enclave: 3},
		{Name: "ks-org", Role: RoleKeyserver},
		{Name: "ks-3", Role: RoleKeyserver, Enclave: 3},
		{Name: "ids", Role: RoleMonitor},
		{Name: "alice", Role: RoleAdmin},
	}
	for _, id := range cases {
		var hosts []string
		if id.Role == RoleKeyserver {
			hosts = []string{"KS.example.org", "127.0.0.1"}
		}
		is, err := a.Issue(id, hosts, 30, now)
		if err != nil {
			t.Fatalf("%v: %v", id, err)
		}
		got, err := a.Verify(is.Cert, now.Add(time.Hour))
		id.Org = "example.org"
		if err != nil || got != id {
			t.Fatalf("Verify: %+v, %v; want %+v", got, err, id)
		}
		if id.Role == RoleKeyserver && (len(is.Cert.IPAddresses) != 1 || is.Cert.DNSNames[0] != "ks.example.org") {
			t.Fatal("host SANs")
		}
		if !strings.HasPrefix(Fingerprint(is.Cert), "sha256:") || len(Fingerprint(is.Cert)) != 71 {
			t.Fatal("fingerprint form")
		}
	}
	if got := (&Identity{Org: "o", Name: "n", Role: RoleServer, Enclave: 3}).URI().String(); got != "spiffe://o/enclave/3/server/n" {
		t.Fatalf("URI %s", got)
	}
}

func TestIssueRefusals(t *testing.T) {
	a, _ := newCA(t)
	cases := []struct {
		id   Identity
		days int
		want error
	}{
		{Identity{Name: "web1", Role: RoleServer, Enclave: 3}, 30, ErrFields},                     // no server id
		{Identity{Name: "web1", Role: RoleServer, ServerID: 1, HasServerID: true}, 30, ErrFields}, // no enclave
		{Identity{Name: "c", Role: RoleClient, ServerID: 1, HasServerID: true}, 30, ErrFields},    // server id on a client
		{Identity{Name: "m", Role: RoleMonitor, Enclave: 3}, 30, ErrFields},                       // monitor in an enclave
		{Identity{Name: "bad name", Role: RoleClient}, 30, ErrName},                               // space
		{Identity{Name: "..", Role: RoleClient}, 30, ErrName},                                     // path escape
		{Identity{Name: "x", Role: "root"}, 30, ErrRole},                                          // unknown role
		{Identity{Org: "other.org", Name: "x", Role: RoleClient}, 30, ErrFields},                  // other org
		{Identity{Name: "x", Role: RoleClient}, 0, ErrValidity},                                   // zero days
		{Identity{Name: "x", Role: RoleClient}, MaxDays + 1, ErrValidity},                         // too long
	}
	for _, c := range cases {
		if _, err := a.Issue(c.id, nil, c.days, now); !errors.Is(err, c.want) {
			t.Errorf("%+v %d days: %v, want %v", c.id, c.days, err, c.want)
		}
	}
	// The whole of the CA's remaining validity may be asked for, and no more.
	left := int(a.Cert.NotAfter.Sub(now.Add(24*time.Hour)) / (24 * time.Hour))
	later := now.Add(24 * time.Hour)
	if _, err := a.Issue(Identity{Name: "x", Role: RoleClient}, nil, left, later); err != nil {
		t.Errorf("%d days (all the CA has left): %v", left, err)
	}
	if _, err := a.Issue(Identity{Name: "x", Role: RoleClient}, nil, left+1, later); !errors.Is(err, ErrValidity) || !strings.Contains(err.Error(), fmt.Sprintf("1 to %d", left)) {
		t.Errorf("%d days: %v, want ErrValidity naming the real limit", left+1, err)
	}
}

// TestHosts: TLS hosts only on key servers, only IPs and DNS names.
func TestHosts(t *testing.T) {
	a, _ := newCA(t)
	ks := Identity{Name: "ks", Role: RoleKeyserver}
	cases := []struct {
		id    Identity
		hosts []string
		want  error
	}{
		{ks, []string{"127.0.0.1", "::1", "localhost", "ks-1.example.org"}, nil},
		{Identity{Name: "c", Role: RoleClient}, []string{"127.0.0.1"}, ErrFields},
		{Identity{Name: "gw", Role: RoleGateway}, []string{"gw.example.org"}, ErrFields},
		{Identity{Name: "web1", Role: RoleServer, Enclave: 3, ServerID: 1, HasServerID: true}, []string{"localhost"}, ErrFields},
		{ks, []string{""}, ErrHost},
		{ks, []string{"bad host"}, ErrHost},
		{ks, []string{"-x.org"}, ErrHost},
		{ks, []string{"a..b"}, ErrHost},
		{ks, []string{"*.example.org"}, ErrHost},
		{ks, []string{strings.Repeat("a", 64) + ".org"}, ErrHost},
		{ks, make([]string, MaxHosts+1), ErrHost},
	}
	for _, c := range cases {
		if _, err := a.Issue(c.id, c.hosts, 30, now); !errors.Is(err, c.want) {
			t.Errorf("%s with hosts %.60q: %v, want %v", c.id.Role, c.hosts, err, c.want)
		}
	}
}

func TestVerifyRefusals(t *testing.T) {
	a, _ := newCA(t)
	foreign, _ := newCA(t)
	is, _ := a.Issue(Identity{Name: "c", Role: RoleClient}, nil, 10, now)
	if _, err := foreign.Verify(is.Cert, now); err == nil {
		t.Fatal("a certificate of another CA was trusted")
	}
	if _, err := a.Verify(is.Cert, now.AddDate(0, 0, 11)); err == nil {
		t.Fatal("an expired certificate was trusted")
	}
	if _, err := a.Verify(is.Cert, now.Add(-time.Hour)); err == nil {
		t.Fatal("a not-yet-valid certificate was trusted")
	}
	if _, err := VerifyWith(is.Cert, is.Cert, now); !errors.Is(err, ErrNotCA) {
		t.Fatalf("a leaf as root: %v", err)
	}
	if _, err := IdentityOf(a.Cert); !errors.Is(err, ErrIdentity) {
		t.Fatalf("the root has no device identity: %v", err)
	}
}

func TestWriteFilesAndLoad(t *testing.T) {
	a, _ := newCA(t)
	out := t.TempDir()
	is, _ := a.Issue(Identity{Name: "web1", Role: RoleServer, Enclave: 3, ServerID: 258, HasServerID: true}, nil, 10, now)
	if err := is.WriteFiles(out, "web1"); err != nil {
		t.Fatal(err)
	}
	if err := is.WriteFiles(out, "web1"); !errors.Is(err, ErrExists) {
		t.Fatalf("overwrite: %v", err)
	}
	st, _ := os.Stat(filepath.Join(out, "web1.key"))
	if st.Mode().Perm() != 0o600 {
		t.Fatalf("key mode %v", st.Mode())
	}
	cert, err := LoadCert(filepath.Join(out, "web1.crt"))
	if err != nil || !cert.Equal(is.Cert) {
		t.Fatalf("LoadCert: %v", err)
	}
	key, err := LoadKey(filepath.Join(out, "web1.key"))
	if err != nil || !key.Public().(ed25519.PublicKey).Equal(cert.PublicKey) {
		t.Fatalf("LoadKey: %v", err)
	}
	if _, err := LoadCert(filepath.Join(out, "web1.key")); !errors.Is(err, ErrPEM) {
		t.Fatalf("key as cert: %v", err)
	}
	if _, err := LoadKey(filepath.Join(out, "web1.crt")); !errors.Is(err, ErrPEM) {
		t.Fatalf("cert as key: %v", err)
	}
}

// FuzzIdentityURI: any URI either is refused or round-trips through
// Identity.URI unchanged.
func FuzzIdentityURI(f *testing.F) {
	for _, s := range []string{"spiffe://example.org/enclave/3/server/web1", "spiffe://o/admin/a", "spiffe://o/enclave/0/client/x", "spiffe://O/x/y", "spiffe://o/enclave/3/server/web1?x=1", "urn:enclave:server-id:7"} {
		f.Add(s, uint32(7), true)
	}
	f.Fuzz(func(t *testing.T, s string, k uint32, hasK bool) {
		u, err := url.Parse(s)
		if err != nil {
			return
		}
		cert := &x509.Certificate{URIs: []*url.URL{u}}
		if hasK {
			cert.URIs = append(cert.URIs, &url.URL{Scheme: "urn", Opaque: "enclave:server-id:" + strconvU(k)})
		}
		id, err := IdentityOf(cert)
		if err != nil {
			if !errors.Is(err, ErrIdentity) {
				t.Fatalf("untyped error %v", err)
			}
			return
		}
		if id.URI().String() != u.String() {
			t.Fatalf("%q parsed to %+v, prints %q", s, id, id.URI())
		}
	})
}

func strconvU(k uint32) string {
	const digits = "0123456789"
	if k == 0 {
		return "0"
	}
	var b []byte
	for ; k > 0; k /= 10 {
		b = append([]byte{digits[k%10]}, b...)
	}
	return string(b)
}

// TestOverlay: an overlay address travels in the certificate and back;
// network addresses, loopback, and roles that run no agent are refused.
func TestOverlay(t *testing.T) {
	a, _ := newCA(t)
	id := Identity{Name: "laptop", Role: RoleClient, Enclave: 7, Overlay: netip.MustParsePrefix("100.64.1.10/16")}
	is, err := a.Issue(id, nil, 30, now)
	if err != nil {
		t.Fatal(err)
	}
	got, err := IdentityOf(is.Cert)
	if err != nil || got.Overlay != id.Overlay {
		t.Fatalf("overlay %v %v", got.Overlay, err)
	}
	for _, bad := range []struct {
		role Role
		p    string
	}{
		{RoleClient, "100.64.0.0/16"}, // the network, not an address
		{RoleClient, "127.0.0.2/8"},   // loopback
		{RoleClient, "100.64.1.10/4"}, // too wide
		{RoleAdmin, "100.64.1.10/16"}, // an admin runs no agent
		{RoleKeyserver, "fd00::5/64"}, // nor a key server
	} {
		id := Identity{Name: "x", Role: bad.role, Overlay: netip.MustParsePrefix(bad.p)}
		if _, err := a.Issue(id, nil, 30, now); !errors.Is(err, ErrFields) {
			t.Errorf("%s %s: %v", bad.role, bad.p, err)
		}
	}
}

// TestRoots: a bundle of two CAs of one org verifies the certificates of
// both (a rollover); a bundle mixing orgs, holding a key or no
// certificate is refused; a certificate of neither is not trusted.
func TestRoots(t *testing.T) {
	dir := t.TempDir()
	now := time.Now()
	oldCA, err := Init(filepath.Join(dir, "old"), "example.org", now)
	if err != nil {
		t.Fatal(err)
	}
	newCA, _ := Init(filepath.Join(dir, "new"), "example.org", now)
	otherCA, _ := Init(filepath.Join(dir, "other"), "other.example", now)
	bundle := filepath.Join(dir, "bundle.crt")
	oldPEM, _ := os.ReadFile(filepath.Join(dir, "old", "ca.crt"))
	newPEM, _ := os.ReadFile(filepath.Join(dir, "new", "ca.crt"))
	otherPEM, _ := os.ReadFile(filepath.Join(dir, "other", "ca.crt"))
	os.WriteFile(bundle, append(append([]byte(nil), oldPEM...), newPEM...), 0o644)
	roots, err := LoadRoots(bundle)
	if err != nil || len(roots.Certs()) != 2 || roots.Org() != "example.org" {
		t.Fatalf("bundle: %v %v", roots, err)
	}
	id := Identity{Name: "web1", Role: RoleClient}
	for _, a := range []*Authority{oldCA, newCA} {
		is, err := a.Issue(id, nil, 30, now)
		if err != nil {
			t.Fatal(err)
		}
		if got, err := roots.Verify(is.Cert, now); err != nil || got.Name != "web1" {
			t.Fatalf("a certificate of one of the bundle's CAs: %v %v", got, err)
		}
		if _, err := oldCA.Roots().Verify(is.Cert, now); (err == nil) != (a == oldCA) {
			t.Fatalf("the old CA alone: %v", err)
		}
	}
	foreign, _ := otherCA.Issue(id, nil, 30, now)
	if _, err := roots.Verify(foreign.Cert, now); err == nil {
		t.Fatal("a certificate of another org's CA verified")
	}
	mixed := filepath.Join(dir, "mixed.crt")
	os.WriteFile(mixed, append(append([]byte(nil), oldPEM...), otherPEM...), 0o644)
	if _, err := LoadRoots(mixed); !errors.Is(err, ErrMixedOrgs) {
		t.Fatalf("mixed orgs: %v", err)
	}
	if _, err := LoadRoots(filepath.Join(dir, "old", "ca.key")); !errors.Is(err, ErrPEM) {
		t.Fatalf("a key as the bundle: %v", err)
	}
	empty := filepath.Join(dir, "empty.crt")
	os.WriteFile(empty, []byte("nothing here\n"), 0o644)
	if _, err := LoadRoots(empty); !errors.Is(err, ErrPEM) {
		t.Fatalf("no certificate: %v", err)
	}
}
