package keyserver

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"time"

	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/fileread"
)

// Credentials are a device's TLS identity and the org roots it trusts.
type Credentials struct {
	Roots *ca.Roots
	Cert  tls.Certificate
}

// LoadCredentials reads the org root and a device certificate and key.
func LoadCredentials(caCert, certFile, keyFile string) (*Credentials, error) {
	roots, err := ca.LoadRoots(caCert)
	if err != nil {
		return nil, fmt.Errorf("--ca: %w", err)
	}
	certPEM, err := fileread.Bounded(certFile, fileread.MaxPEM)
	if err != nil {
		return nil, fmt.Errorf("--cert: %w", err)
	}
	keyPEM, err := fileread.Bounded(keyFile, fileread.MaxPEM)
	if err != nil {
		return nil, fmt.Errorf("--key: %w", err)
	}
	pair, err := tls.X509KeyPair(certPEM, keyPEM)
	clear(keyPEM)
	if err != nil {
		return nil, fmt.Errorf("--cert/--key: %w", err)
	}
	return &Credentials{Roots: roots, Cert: pair}, nil
}

func (c *Credentials) pool() *x509.CertPool { return c.Roots.Pool() }

// Identity verifies the credentials' own certificate (and its issuing CA,
// if it has one) under their roots at now and returns its identity.
func (c *Credentials) Identity(now time.Time) (ca.Identity, error) {
	var chain []*x509.Certificate
	for _, der := range c.Cert.Certificate {
		x, err := x509.ParseCertificate(der)
		if err != nil {
			return ca.Identity{}, err
		}
		chain = append(chain, x)
	}
	return c.Roots.VerifyChain(chain, now)
}

// ServerTLS is TLS 1.3 verifying a client certificate against the org
// roots when one is given. Every RPC but Enroll.Join refuses a call
// without one (Service.identify); Join is how a host without a
// certificate gets one. The served chain ends with the org roots, so that
// a joining host can check the key server against the CA fingerprint it
// was given.
func (c *Credentials) ServerTLS() *tls.Config {
	served := c.Cert
	served.Certificate = append([][]byte(nil), c.Cert.Certificate...)
	for _, r := range c.Roots.Certs() {
		served.Certificate = append(served.Certificate, r.Raw)
	}
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{served},
		ClientAuth:   tls.VerifyClientCertIfGiven,
		ClientCAs:    c.pool(),
	}
}

// ErrNotKeyserver: the server's certificate chains to the org root but is
// not a key server's.
var ErrNotKeyserver = errors.New("keyserver: the server's certificate is not a key server's")

// ClientTLS is TLS 1.3 presenting the device certificate and trusting only
// the org root for the server's, which must also carry the key-server role
// of the same org: any device of the org holds a certificate from that root,
// and none but a key server may answer for the key service.
func (c *Credentials) ClientTLS(serverName string) *tls.Config {
	org := c.Roots.Org()
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{c.Cert},
		RootCAs:      c.pool(),
		ServerName:   serverName,
		VerifyConnection: func(cs tls.ConnectionState) error {
			return requireKeyserver(cs, org)
		},
	}
}

// requireKeyserver checks the verified leaf of a connection's server.
func requireKeyserver(cs tls.ConnectionState, org string) error {
	if len(cs.VerifiedChains) == 0 || len(cs.VerifiedChains[0]) == 0 {
		return fmt.Errorf("%w: no verified chain", ErrNotKeyserver)
	}
	id, err := ca.IdentityOf(cs.VerifiedChains[0][0])
	switch {
	case err != nil:
		return fmt.Errorf("%w: %v", ErrNotKeyserver, err)
	case id.Org != org:
		return fmt.Errorf("%w: it is of org %s, not %s", ErrNotKeyserver, id.Org, org)
	case id.Role != ca.RoleKeyserver:
		return fmt.Errorf("%w: it belongs to %s, a %s", ErrNotKeyserver, id.Name, id.Role)
	}
	return nil
}
