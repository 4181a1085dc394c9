package keyserver

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"

	"github.com/enclavekeys/enclave/internal/ca"
)

// Credentials are a device's TLS identity and the org root it trusts.
type Credentials struct {
	Root *x509.Certificate
	Cert tls.Certificate
}

// LoadCredentials reads the org root and a device certificate and key.
func LoadCredentials(caCert, certFile, keyFile string) (*Credentials, error) {
	root, err := ca.LoadCert(caCert)
	if err != nil {
		return nil, fmt.Errorf("--ca: %w", err)
	}
	pair, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, fmt.Errorf("--cert/--key: %w", err)
	}
	return &Credentials{Root: root, Cert: pair}, nil
}

func (c *Credentials) pool() *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(c.Root)
	return p
}

// ServerTLS is TLS 1.3 requiring a client certificate that chains to the
// org root.
func (c *Credentials) ServerTLS() *tls.Config {
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{c.Cert},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    c.pool(),
	}
}

// ClientTLS is TLS 1.3 presenting the device certificate and trusting only
// the org root for the server's.
func (c *Credentials) ClientTLS(serverName string) *tls.Config {
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{c.Cert},
		RootCAs:      c.pool(),
		ServerName:   serverName,
	}
}
