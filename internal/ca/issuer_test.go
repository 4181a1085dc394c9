package ca

import (
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"net/url"
	"path/filepath"
	"testing"
	"time"
)

// TestIssuer: a root signs an issuing CA; what the issuer signs carries
// it as its chain and verifies under the root with it, not without it; an
// issuer signs no other issuer; a root made with path length 0 (before
// issuers) cannot have one; a device certificate is no issuer.
func TestIssuer(t *testing.T) {
	dir := t.TempDir()
	now := time.Now()
	root, err := Init(filepath.Join(dir, "ca"), "example.org", now)
	if err != nil {
		t.Fatal(err)
	}
	is, err := root.IssueIssuer("ks1", 365, now)
	if err != nil {
		t.Fatal(err)
	}
	if err := is.WriteFiles(dir, "ks1-issuer"); err != nil {
		t.Fatal(err)
	}
	issuer, err := LoadIssuer(filepath.Join(dir, "ks1-issuer.crt"), filepath.Join(dir, "ks1-issuer.key"))
	if err != nil {
		t.Fatal(err)
	}
	dev, err := issuer.Issue(Identity{Name: "web2", Role: RoleServer, Enclave: 3, ServerID: 302, HasServerID: true}, nil, 30, now)
	if err != nil {
		t.Fatal(err)
	}
	if len(dev.Chain) != 1 || !dev.Chain[0].Equal(issuer.Cert) {
		t.Fatalf("chain %v", dev.Chain)
	}
	if err := dev.WriteFiles(dir, "web2"); err != nil {
		t.Fatal(err)
	}
	chain, err := LoadChain(filepath.Join(dir, "web2.crt"))
	if err != nil || len(chain) != 2 {
		t.Fatalf("the device's file holds %d certificates: %v", len(chain), err)
	}
	roots := root.Roots()
	if id, err := roots.VerifyChain(chain, now); err != nil || id.Name != "web2" || id.ServerID != 302 {
		t.Fatalf("with its chain: %+v %v", id, err)
	}
	if _, err := roots.Verify(chain[0], now); err == nil {
		t.Fatal("a device certificate of an issuer verified without the issuer")
	}
	if _, err := issuer.IssueIssuer("deeper", 30, now); !errors.Is(err, ErrPathLen) {
		t.Fatalf("an issuer making an issuer: %v", err)
	}
	// A device certificate presented as an issuer.
	other, _ := root.Issue(Identity{Name: "laptop", Role: RoleClient}, nil, 30, now)
	if _, err := roots.VerifyChain([]*x509.Certificate{chain[0], other.Cert}, now); !errors.Is(err, ErrNotIssuer) {
		t.Fatalf("a device as issuer: %v", err)
	}
	// An issuer of another org's root.
	foreignRoot, _ := Init(filepath.Join(dir, "other"), "other.example", now)
	fi, _ := foreignRoot.IssueIssuer("x", 30, now)
	if _, err := roots.VerifyChain([]*x509.Certificate{chain[0], fi.Cert}, now); !errors.Is(err, ErrNotIssuer) {
		t.Fatalf("another org's issuer: %v", err)
	}
	// A root with path length 0, as ca init made them before issuers.
	tmpl := &x509.Certificate{Subject: pkix.Name{CommonName: "old"}, NotBefore: now.Add(-time.Hour), NotAfter: now.AddDate(1, 0, 0),
		IsCA: true, BasicConstraintsValid: true, MaxPathLenZero: true, KeyUsage: x509.KeyUsageCertSign,
		URIs: []*url.URL{{Scheme: "spiffe", Host: "example.org"}}}
	old, priv, err := sign(tmpl, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	a := &Authority{Cert: old.Cert, Key: priv, Org: "example.org"}
	if _, err := a.IssueIssuer("ks1", 30, now); !errors.Is(err, ErrPathLen) {
		t.Fatalf("under a path-length-0 root: %v", err)
	}
	if _, err := LoadIssuer(filepath.Join(dir, "web2.crt"), filepath.Join(dir, "web2.key")); !errors.Is(err, ErrNotIssuer) {
		t.Fatalf("a device certificate loaded as an issuer: %v", err)
	}
}
