package ca

import (
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"time"

	"github.com/enclavekeys/enclave/internal/echo"
	"github.com/enclavekeys/enclave/internal/fileread"
)

// Roots are the org CA certificates a device trusts: one, or two while a
// new CA is brought in and the old one retired (a rollover: every device
// trusts both, devices move to certificates of the new CA, then the old
// one leaves the bundle). All are roots of one org.
type Roots struct {
	certs []*x509.Certificate
	org   string
	pool  *x509.CertPool
}

// ErrMixedOrgs: a bundle's roots belong to different orgs.
var ErrMixedOrgs = errors.New("ca: the CA bundle mixes organisations")

// NewRoots checks that each certificate is an Enclave root of one org.
func NewRoots(certs ...*x509.Certificate) (*Roots, error) {
	if len(certs) == 0 {
		return nil, fmt.Errorf("%w: no CA certificate", ErrNotCA)
	}
	r := &Roots{pool: x509.NewCertPool()}
	for _, c := range certs {
		org, err := rootOrg(c)
		if err != nil {
			return nil, err
		}
		if r.org != "" && org != r.org {
			return nil, fmt.Errorf("%w: %s and %s", ErrMixedOrgs, r.org, echo.Cut(org))
		}
		r.org = org
		r.certs = append(r.certs, c)
		r.pool.AddCert(c)
	}
	return r, nil
}

// LoadRoots reads a PEM file of one or more CA certificates.
func LoadRoots(path string) (*Roots, error) {
	certs, err := loadCerts(path)
	if err != nil {
		return nil, err
	}
	r, err := NewRoots(certs...)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return r, nil
}

// loadCerts reads every certificate of a PEM file, refusing a private key.
func loadCerts(path string) ([]*x509.Certificate, error) {
	b, err := fileread.Bounded(path, fileread.MaxPEM)
	if err != nil {
		return nil, err
	}
	certs, err := ParsePEMCerts(b)
	switch {
	case errors.Is(err, errPEMKey):
		return nil, fmt.Errorf("%w: %s holds a private key, not certificates (the certificate is the .crt file beside it)", ErrPEM, path)
	case err != nil:
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return certs, nil
}

var errPEMKey = fmt.Errorf("%w: a private key among the certificates", ErrPEM)

// ParsePEMCerts parses every certificate of PEM text (blocks of other
// types are skipped; a private key is refused): a device's chain, or a
// bundle of CAs. None at all is an error.
func ParsePEMCerts(b []byte) ([]*x509.Certificate, error) {
	var certs []*x509.Certificate
	for rest := b; ; {
		var block *pem.Block
		block, rest = pem.Decode(rest)
		if block == nil {
			break
		}
		if block.Type == "PRIVATE KEY" {
			clear(block.Bytes)
			return nil, errPEMKey
		}
		if block.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("%w: %v", ErrPEM, err)
		}
		certs = append(certs, c)
	}
	if len(certs) == 0 {
		return nil, fmt.Errorf("%w: no certificate", ErrPEM)
	}
	return certs, nil
}

// Org is the organisation (trust domain) of the roots.
func (r *Roots) Org() string { return r.org }

// Pool is the roots as a certificate pool (for TLS).
func (r *Roots) Pool() *x509.CertPool { return r.pool }

// Certs are the root certificates, in the bundle's order.
func (r *Roots) Certs() []*x509.Certificate { return r.certs }

// Holds reports whether cert is one of the bundle's CA certificates.
func (r *Roots) Holds(cert *x509.Certificate) bool {
	for _, c := range r.certs {
		if c.Equal(cert) {
			return true
		}
	}
	return false
}

// Verify checks that cert chains to one of the roots at now and returns
// its identity, which must be of the roots' org.
func (r *Roots) Verify(cert *x509.Certificate, now time.Time) (Identity, error) {
	return r.VerifyChain([]*x509.Certificate{cert}, now)
}

// MaxChain is the most certificates a device presents: its own and one
// issuing CA.
const MaxChain = 2

// VerifyChain is Verify of chain[0], with chain[1:] the issuing CAs
// between it and a root (each must be one of the roots' org).
func (r *Roots) VerifyChain(chain []*x509.Certificate, now time.Time) (Identity, error) {
	if len(chain) == 0 || len(chain) > MaxChain {
		return Identity{}, fmt.Errorf("%w: a chain of %d certificates", ErrIdentity, len(chain))
	}
	cert := chain[0]
	var inter *x509.CertPool
	for _, c := range chain[1:] {
		org, _, err := issuerOf(c)
		if err != nil {
			return Identity{}, err
		}
		if org != r.org {
			return Identity{}, fmt.Errorf("%w: an issuing CA of org %q under roots of %q", ErrNotIssuer, echo.Cut(org), r.org)
		}
		if inter == nil {
			inter = x509.NewCertPool()
		}
		inter.AddCert(c)
	}
	if _, err := cert.Verify(x509.VerifyOptions{Roots: r.pool, Intermediates: inter, CurrentTime: now, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		return Identity{}, fmt.Errorf("ca: certificate not trusted: %w", err)
	}
	id, err := IdentityOf(cert)
	if err != nil {
		return Identity{}, err
	}
	if id.Org != r.org {
		return Identity{}, fmt.Errorf("%w: certificate of org %q under root of %q", ErrIdentity, echo.Cut(id.Org), r.org)
	}
	return id, nil
}
