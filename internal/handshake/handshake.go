// Package handshake runs the control protocol's handshake (docs/PROTOCOL.md,
// DESIGN §5.2): Noise IX (X25519, AES-GCM, SHA-256) with each side's org-CA
// certificate bound to its Noise static key by a signature, the cookies that
// protect a loaded responder (§5.8), and the sessions that carry sealed
// control messages afterwards. It decides nothing about policy: the caller
// (the agent) decides what to grant to whom.
package handshake

import (
	"crypto/ed25519"
	"crypto/sha256"
	"crypto/x509"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/flynn/noise"

	"github.com/enclavekeys/enclave/internal/ca"
)

// suite is the Noise cipher suite of the protocol.
var suite = noise.NewCipherSuite(dh25519, noise.CipherAESGCM, noise.HashSHA256)

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
	Roots *ca.Roots // the org CA, or CAs during a rollover
	Cert  *x509.Certificate
	// Chain are the issuing CAs between Cert and the root (none when the
	// root signed it); CertDER is Cert's DER followed by theirs, what
	// handshakes carry.
	Chain   []*x509.Certificate
	CertDER []byte
	Key     ed25519.PrivateKey
	Static  noise.DHKey
	// verified remembers peer certificates that verified against Roots, so
	// that a peer's next handshake (a rekey) skips parsing and chain
	// building; the signature binding it to the handshake is still checked
	// every time, and the validity period too.
	verified *certCache
}

// NewCredentials checks that key belongs to cert, and makes a fresh Noise
// static key pair; peers are verified against roots. chain are the
// issuing CAs between cert and the root, if any.
func NewCredentials(roots *ca.Roots, cert *x509.Certificate, key ed25519.PrivateKey, chain ...*x509.Certificate) (*Credentials, error) {
	if len(chain)+1 > ca.MaxChain {
		return nil, fmt.Errorf("%w: a chain of %d certificates", ErrCert, len(chain)+1)
	}
	pub, ok := cert.PublicKey.(ed25519.PublicKey)
	if !ok || !pub.Equal(key.Public()) {
		return nil, fmt.Errorf("%w: the key does not belong to the certificate", ErrCert)
	}
	static, err := suite.GenerateKeypair(nil)
	if err != nil {
		return nil, err
	}
	der := append([]byte(nil), cert.Raw...)
	for _, c := range chain {
		der = append(der, c.Raw...)
	}
	return &Credentials{Roots: roots, Cert: cert, Chain: chain, CertDER: der, Key: key, Static: static, verified: newCertCache()}, nil
}

// Replaces checks that c may take the place of the credentials of the
// device with identity id (a reload): its certificate is valid under its
// own roots at now and names the same identity.
func (c *Credentials) Replaces(id ca.Identity, now time.Time) error {
	got, err := c.Roots.VerifyChain(append([]*x509.Certificate{c.Cert}, c.Chain...), now)
	if err != nil {
		return fmt.Errorf("%w: the new certificate: %v", ErrCert, err)
	}
	if got != id {
		return fmt.Errorf("%w: the new certificate is %s's, this device is %s", ErrCert, got, id)
	}
	return nil
}

// Expires is when c's own chain stops being valid: its certificate's or
// an issuing CA's end, the earlier.
func (c *Credentials) Expires() time.Time {
	end := c.Cert.NotAfter
	for _, x := range c.Chain {
		end = earlier(end, x.NotAfter)
	}
	return end
}

// Peer is the authenticated other side of a handshake.
type Peer struct {
	Identity ca.Identity
	Cert     *x509.Certificate
	// Expires is when the peer's chain stops being valid (its
	// certificate's or its issuing CA's end, the earlier): no SA with it
	// may outlive that.
	Expires time.Time
	// Static is the peer's Noise static public key.
	Static []byte
}

// verifyPeer checks a peer certificate against the root at now (or finds
// it already verified), and its signature over signed.
func (c *Credentials) verifyPeer(der, sig, signed []byte, now time.Time) (*Peer, error) {
	v, ok := c.verified.get(der)
	if !ok {
		chain, err := x509.ParseCertificates(der) // the peer's, then its issuing CA's, if any
		if err != nil || len(chain) == 0 {
			return nil, fmt.Errorf("%w: %v", ErrCert, err)
		}
		id, err := c.Roots.VerifyChain(chain, now)
		if err != nil {
			return nil, fmt.Errorf("%w: %v", ErrCert, err)
		}
		cert := chain[0]
		pub, isEd := cert.PublicKey.(ed25519.PublicKey)
		if !isEd {
			return nil, fmt.Errorf("%w: not an Ed25519 certificate", ErrCert)
		}
		v = verifiedCert{cert: cert, id: id, pub: pub, notBefore: cert.NotBefore, notAfter: cert.NotAfter}
		for _, x := range chain[1:] { // valid while every certificate of the chain is
			v.notBefore, v.notAfter = later(v.notBefore, x.NotBefore), earlier(v.notAfter, x.NotAfter)
		}
		c.verified.put(der, v)
	} else if now.Before(v.notBefore) || now.After(v.notAfter) {
		return nil, fmt.Errorf("%w: not valid at %s", ErrCert, now.UTC().Format(time.RFC3339))
	}
	if !ed25519.Verify(v.pub, signed, sig) {
		return nil, ErrSignature
	}
	return &Peer{Identity: v.id, Cert: v.cert, Expires: v.notAfter}, nil
}

// ForgetVerified empties c's memory of verified peer certificates (after a
// change of trust, and for measuring first contacts).
func ForgetVerified(c *Credentials) {
	c.verified.mu.Lock()
	clear(c.verified.m)
	c.verified.mu.Unlock()
}

// verifiedCert is a peer certificate that chained to the root.
type verifiedCert struct {
	cert *x509.Certificate
	id   ca.Identity
	pub  ed25519.PublicKey
	// notBefore and notAfter bound the chain's validity (the peer's
	// certificate's and its issuer's).
	notBefore, notAfter time.Time
}

func later(a, b time.Time) time.Time {
	if b.After(a) {
		return b
	}
	return a
}

func earlier(a, b time.Time) time.Time {
	if b.Before(a) {
		return b
	}
	return a
}

// maxVerified bounds the cache of verified certificates.
const maxVerified = 4096

type certCache struct {
	mu sync.Mutex
	m  map[[32]byte]verifiedCert
}

func newCertCache() *certCache { return &certCache{m: map[[32]byte]verifiedCert{}} }

func (c *certCache) get(der []byte) (verifiedCert, bool) {
	if c == nil {
		return verifiedCert{}, false
	}
	k := sha256.Sum256(der)
	c.mu.Lock()
	defer c.mu.Unlock()
	v, ok := c.m[k]
	return v, ok
}

func (c *certCache) put(der []byte, v verifiedCert) {
	if c == nil {
		return
	}
	k := sha256.Sum256(der)
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.m) >= maxVerified {
		clear(c.m)
	}
	c.m[k] = v
}
