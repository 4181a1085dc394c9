package keyclient

import (
	"context"
	"crypto/ed25519"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"time"

	"github.com/enclavekeys/enclave/internal/api"
	"github.com/enclavekeys/enclave/internal/ca"
)

// Renewed is a certificate the key service issued for a key made here.
type Renewed struct {
	// CertPEM is the device's certificate, then its issuing CA's.
	CertPEM []byte
	// KeyPEM is the new private key (PKCS #8).
	KeyPEM []byte
	Cert   *x509.Certificate
	ID     ca.Identity
}

// ErrRenewAnswer: the key service's answer to a renewal is not a
// certificate for this device's identity and new key under its CA bundle.
var ErrRenewAnswer = errors.New("keyclient: the key service's renewal answer does not verify")

// Renew makes a new Ed25519 key here and asks the key service, over the
// connection c (mutual TLS with the device's current certificate), for a
// certificate for it. The answer must be a certificate for exactly the
// identity want, for the new key, verifying under roots at now. The new
// key never leaves this process but in the result.
func Renew(ctx context.Context, c api.EnrollClient, roots *ca.Roots, want ca.Identity, now time.Time) (*Renewed, error) {
	priv, csr, err := ca.NewKeyRequest()
	if err != nil {
		return nil, err
	}
	r, err := c.Renew(ctx, &api.RenewRequest{Csr: csr})
	if err != nil {
		return nil, err
	}
	chain, err := ca.ParsePEMCerts(r.GetCertificatePem())
	if err != nil || len(chain) == 0 {
		return nil, fmt.Errorf("%w: %v", ErrRenewAnswer, err)
	}
	id, err := roots.VerifyChain(chain, now)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrRenewAnswer, err)
	}
	if id != want {
		return nil, fmt.Errorf("%w: it is for %s, not %s", ErrRenewAnswer, id, want)
	}
	if pub, ok := chain[0].PublicKey.(ed25519.PublicKey); !ok || !pub.Equal(priv.Public()) {
		return nil, fmt.Errorf("%w: it is for another key", ErrRenewAnswer)
	}
	der, err := x509.MarshalPKCS8PrivateKey(priv)
	if err != nil {
		return nil, err
	}
	defer clear(der)
	return &Renewed{CertPEM: r.GetCertificatePem(), KeyPEM: pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), Cert: chain[0], ID: id}, nil
}
