package ca

import (
	"crypto/ed25519"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"github.com/enclavekeys/enclave/internal/echo"
	"github.com/enclavekeys/enclave/internal/fileread"
)

// An issuing CA signs device certificates in the root's name, so that the
// root's key can stay offline: a certificate the root signed, that may sign
// device certificates and nothing else (path length 0), named
// spiffe://ORG/issuer/NAME. A device certificate it signed carries it as
// its chain.

// ErrPathLen: this root cannot have issuing CAs under it (it was made with
// path length 0, before they existed).
var ErrPathLen = errors.New("ca: this CA was made without room for an issuing CA under it (path length 0); roll over to a new CA (enclave ca init makes one with room) to delegate issuance")

// ErrNotIssuer: a certificate in a chain is not an issuing CA of the org.
var ErrNotIssuer = errors.New("ca: not an issuing CA of this org")

var issuerNameRE = regexp.MustCompile(`^[A-Za-z0-9._-]{1,64}$`)

// IssueIssuer signs an issuing CA named name, valid for days from now.
func (a *Authority) IssueIssuer(name string, days int, now time.Time) (*Issued, error) {
	if a.issuer {
		return nil, fmt.Errorf("%w: an issuing CA cannot make another", ErrPathLen)
	}
	if a.Cert.MaxPathLenZero || a.Cert.MaxPathLen == 0 {
		return nil, ErrPathLen
	}
	if !issuerNameRE.MatchString(name) {
		return nil, fmt.Errorf("%w: issuer name %q (letters, digits, . _ -; at most 64)", ErrFields, echo.Cut(name))
	}
	if maxDays := min(MaxDays, int(a.Cert.NotAfter.Sub(now)/(24*time.Hour))); days < 1 || days > maxDays {
		return nil, fmt.Errorf("%w: %d days; the CA's certificate allows 1 to %d", ErrValidity, days, max(maxDays, 0))
	}
	tmpl := &x509.Certificate{
		Subject:               pkix.Name{CommonName: name + " issuer of " + a.Org, Organization: []string{a.Org}},
		NotBefore:             now.Add(-backdateIssued),
		NotAfter:              now.AddDate(0, 0, days),
		IsCA:                  true,
		BasicConstraintsValid: true,
		MaxPathLenZero:        true,
		KeyUsage:              x509.KeyUsageCertSign,
		URIs:                  []*url.URL{{Scheme: "spiffe", Host: a.Org, Path: "/issuer/" + name}},
	}
	is, _, err := sign(tmpl, a.Cert, a.Key)
	return is, err
}

// issuerOf checks that cert is an issuing CA and returns its org and name.
func issuerOf(cert *x509.Certificate) (org, name string, err error) {
	if !cert.IsCA || !cert.BasicConstraintsValid || !cert.MaxPathLenZero || len(cert.URIs) != 1 || cert.URIs[0].Scheme != "spiffe" {
		return "", "", ErrNotIssuer
	}
	n, ok := strings.CutPrefix(cert.URIs[0].Path, "/issuer/")
	if !ok || !issuerNameRE.MatchString(n) {
		return "", "", ErrNotIssuer
	}
	if _, ok := cert.PublicKey.(ed25519.PublicKey); !ok {
		return "", "", ErrNotIssuer
	}
	return cert.URIs[0].Host, n, nil
}

// LoadIssuer reads an issuing CA's certificate and key, checking that the
// key is the certificate's.
func LoadIssuer(certFile, keyFile string) (*Authority, error) {
	cert, err := LoadCert(certFile)
	if err != nil {
		return nil, err
	}
	key, err := LoadKey(keyFile)
	if err != nil {
		return nil, err
	}
	a, err := NewIssuer(cert, key)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", certFile, err)
	}
	return a, nil
}

// NewIssuer is an issuing CA from its certificate and key.
func NewIssuer(cert *x509.Certificate, key ed25519.PrivateKey) (*Authority, error) {
	org, _, err := issuerOf(cert)
	if err != nil {
		return nil, err
	}
	if !cert.PublicKey.(ed25519.PublicKey).Equal(key.Public()) {
		return nil, ErrKeyMatch
	}
	return &Authority{Cert: cert, Key: key, Org: org, issuer: true}, nil
}

// LoadChain reads a device's certificate file: its certificate, then the
// issuing CAs between it and the root, if any.
func LoadChain(path string) ([]*x509.Certificate, error) { return loadCerts(path) }

// NewRequest makes an Ed25519 key and a signing request for it (both PEM):
// what a device sends a CA kept offline, its key staying on the device.
func NewRequest() (keyPEM, csrPEM []byte, err error) {
	priv, der, err := NewKeyRequest()
	if err != nil {
		return nil, nil, err
	}
	if keyPEM, err = keyToPEM(priv); err != nil {
		return nil, nil, err
	}
	return keyPEM, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}), nil
}

// NewKeyRequest makes an Ed25519 key and a signing request for it (DER),
// as enclave join sends to the key service.
func NewKeyRequest() (ed25519.PrivateKey, []byte, error) {
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	der, err := RequestFor(priv)
	if err != nil {
		return nil, nil, err
	}
	return priv, der, nil
}

// RequestFor makes a signing request (DER) for a key the host holds: a
// join tried again sends the same key's.
func RequestFor(priv ed25519.PrivateKey) ([]byte, error) {
	return x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, priv)
}

// ParseRequest checks a signing request (DER) and returns its Ed25519 key.
func ParseRequest(der []byte) (ed25519.PublicKey, error) {
	csr, err := x509.ParseCertificateRequest(der)
	if err == nil {
		err = csr.CheckSignature()
	}
	if err != nil {
		return nil, fmt.Errorf("%w: signing request: %v", ErrPEM, err)
	}
	pub, ok := csr.PublicKey.(ed25519.PublicKey)
	if !ok {
		return nil, fmt.Errorf("%w: the signing request's key is not Ed25519", ErrPEM)
	}
	return pub, nil
}

// LoadRequest reads a PEM signing request and returns its checked key.
func LoadRequest(path string) (ed25519.PublicKey, error) {
	b, err := fileread.Bounded(path, fileread.MaxPEM)
	if err != nil {
		return nil, err
	}
	block, _ := pem.Decode(b)
	if block == nil || block.Type != "CERTIFICATE REQUEST" {
		return nil, fmt.Errorf("%w: %s is no signing request", ErrPEM, path)
	}
	return ParseRequest(block.Bytes)
}

// WriteNew writes data to dir/name with mode, refusing to replace a file.
func WriteNew(dir, name string, data []byte, mode os.FileMode) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	path := filepath.Join(dir, name)
	if err := refuseExisting(path); err != nil {
		return err
	}
	return os.WriteFile(path, data, mode)
}
