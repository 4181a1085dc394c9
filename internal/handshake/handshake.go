// Package handshake runs the control protocol's handshake (docs/PROTOCOL.md,
// DESIGN §5.2): Noise IX (X25519, AES-GCM, SHA-256) with each side's org-CA
// certificate bound to its Noise static key by a signature, the cookies that
// protect a loaded responder (§5.8), and the sessions that carry sealed
// control messages afterwards. It decides nothing about policy: the caller
// (the agent) decides what to grant to whom.
package handshake

import (
	"crypto/ed25519"
	"crypto/x509"
	"errors"
	"fmt"
	"time"

	"github.com/flynn/noise"

	"github.com/enclavekeys/enclave/internal/ca"
)

// suite is the Noise cipher suite of the protocol.
var suite = noise.NewCipherSuite(noise.DH25519, noise.CipherAESGCM, noise.HashSHA256)

// Errors of the handshake. Each is a reason a peer is refused; callers log
// and count them.
var (
	ErrNoise     = errors.New("handshake: the Noise handshake failed (wrong keys or a changed message)")
	ErrPayload   = errors.New("handshake: malformed handshake payload")
	ErrCert      = errors.New("handshake: the peer's certificate is not a valid certificate of the org CA")
	ErrSignature = errors.New("handshake: the peer's signature does not bind its certificate to the handshake")
	ErrClock     = errors.New("handshake: the initiation's timestamp is too far from this clock")
	ErrReplay    = errors.New("handshake: the initiation is not newer than the last one from this peer (a replay)")
	ErrIndex     = errors.New("handshake: the response is not for this initiation")
	ErrRole      = errors.New("handshake: the peer's role may not do this")
)

// Credentials are what a device brings to a handshake: the org root it
// trusts, its certificate and key, and its Noise static key pair (made
// fresh per process: the certificate signature binds it each time).
type Credentials struct {
	Root    *x509.Certificate
	Cert    *x509.Certificate
	CertDER []byte
	Key     ed25519.PrivateKey
	Static  noise.DHKey
}

// NewCredentials checks that cert is a valid certificate of root held with
// key, and makes a fresh Noise static key pair.
func NewCredentials(root, cert *x509.Certificate, key ed25519.PrivateKey) (*Credentials, error) {
	pub, ok := cert.PublicKey.(ed25519.PublicKey)
	if !ok || !pub.Equal(key.Public()) {
		return nil, fmt.Errorf("%w: the key does not belong to the certificate", ErrCert)
	}
	static, err := suite.GenerateKeypair(nil)
	if err != nil {
		return nil, err
	}
	return &Credentials{Root: root, Cert: cert, CertDER: cert.Raw, Key: key, Static: static}, nil
}

// Peer is the authenticated other side of a handshake.
type Peer struct {
	Identity ca.Identity
	Cert     *x509.Certificate
	// Static is the peer's Noise static public key.
	Static []byte
}

// verifyPeer parses and checks a peer certificate against the root at now,
// and its signature over signed.
func verifyPeer(root *x509.Certificate, der, sig, signed []byte, now time.Time) (*Peer, error) {
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrCert, err)
	}
	id, err := ca.VerifyWith(root, cert, now)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrCert, err)
	}
	pub, ok := cert.PublicKey.(ed25519.PublicKey)
	if !ok {
		return nil, fmt.Errorf("%w: not an Ed25519 certificate", ErrCert)
	}
	if !ed25519.Verify(pub, signed, sig) {
		return nil, ErrSignature
	}
	return &Peer{Identity: id, Cert: cert}, nil
}
