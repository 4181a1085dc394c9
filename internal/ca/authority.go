package ca

import (
	"crypto/ed25519"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"github.com/enclavekeys/enclave/internal/echo"
	"github.com/enclavekeys/enclave/internal/fileread"
)

// File names of a CA directory.
const (
	CertFile = "ca.crt"
	KeyFile  = "ca.key"
)

// Validity limits of certificates.
const (
	CAValidity     = 10 * 365 * 24 * time.Hour
	DefaultDays    = 365
	MaxDays        = 10 * 365
	backdateIssued = time.Minute // tolerate small clock differences
)

// Errors of the authority.
var (
	ErrExists   = errors.New("ca: file exists; refusing to overwrite")
	ErrNotCA    = errors.New("ca: not an Enclave CA certificate")
	ErrKeyMatch = errors.New("ca: CA key does not match the CA certificate")
	ErrPEM      = errors.New("ca: not a PEM certificate or key")
	ErrValidity = errors.New("ca: validity out of range")
	ErrHost     = errors.New("ca: a host is an IP address or a DNS name")
)

// Authority is an org's root: its certificate and signing key.
type Authority struct {
	Cert *x509.Certificate
	Key  ed25519.PrivateKey
	// Org is the trust domain, from the certificate.
	Org string
	// issuer: Cert is an issuing CA under the root, not the root; what it
	// issues carries it as its chain.
	issuer bool
}

// Roots are the authority's own certificate as the roots a device trusts
// (one CA; a rollover's bundle is made with NewRoots or LoadRoots).
func (a *Authority) Roots() *Roots {
	p := x509.NewCertPool()
	p.AddCert(a.Cert)
	return &Roots{certs: []*x509.Certificate{a.Cert}, org: a.Org, pool: p}
}

// Init creates a new root for org in dir (created if missing): ca.crt, and
// ca.key with mode 0600. It refuses to overwrite either file.
func Init(dir, org string, now time.Time) (*Authority, error) {
	if !validOrg(org) {
		return nil, fmt.Errorf("%w: %q", ErrOrg, echo.Cut(org))
	}
	certPath, keyPath := filepath.Join(dir, CertFile), filepath.Join(dir, KeyFile)
	if err := refuseExisting(certPath, keyPath); err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		Subject:               pkix.Name{CommonName: org + " Enclave CA", Organization: []string{org}},
		NotBefore:             now.Add(-backdateIssued),
		NotAfter:              now.Add(CAValidity),
		IsCA:                  true,
		BasicConstraintsValid: true,
		// One issuing CA may stand between the root and devices (a key
		// service's, so that the root's key can stay offline).
		MaxPathLen: 1,
		KeyUsage:   x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		URIs:       []*url.URL{{Scheme: "spiffe", Host: org}},
	}
	is, priv, err := sign(tmpl, nil, nil)
	if err != nil {
		return nil, err
	}
	if err := writePair(dir, certPath, keyPath, is.CertPEM, is.KeyPEM); err != nil {
		return nil, err
	}
	return &Authority{Cert: is.Cert, Key: priv, Org: org}, nil
}

// Load reads a CA directory and checks that the key matches the certificate.
func Load(dir string) (*Authority, error) {
	cert, err := LoadCert(filepath.Join(dir, CertFile))
	if err != nil {
		return nil, err
	}
	org, err := rootOrg(cert)
	if err != nil {
		return nil, err
	}
	key, err := LoadKey(filepath.Join(dir, KeyFile))
	if err != nil {
		return nil, err
	}
	pub, ok := cert.PublicKey.(ed25519.PublicKey)
	if !ok || !pub.Equal(key.Public()) {
		return nil, ErrKeyMatch
	}
	return &Authority{Cert: cert, Key: key, Org: org}, nil
}

// OrgOf checks that cert is an Enclave root and returns its org.
func OrgOf(cert *x509.Certificate) (string, error) { return rootOrg(cert) }

// rootOrg checks that cert is an Enclave root and returns its org.
func rootOrg(cert *x509.Certificate) (string, error) {
	if !cert.IsCA || len(cert.URIs) != 1 || cert.URIs[0].Scheme != "spiffe" || cert.URIs[0].Path != "" {
		return "", ErrNotCA
	}
	if _, ok := cert.PublicKey.(ed25519.PublicKey); !ok {
		return "", ErrNotCA
	}
	return cert.URIs[0].Host, nil
}

// Issued is a new device certificate with its private key, both PEM.
type Issued struct {
	Cert *x509.Certificate
	// Chain are the issuing CAs between Cert and the root (none when the
	// root signed it); CertPEM holds Cert and then them.
	Chain   []*x509.Certificate
	CertPEM []byte
	KeyPEM  []byte
}

// Issue signs a certificate for id (whose Org must be the authority's),
// valid for days from now. hosts become DNS or IP SANs, for devices that
// also serve TLS (a key server's address).
func (a *Authority) Issue(id Identity, hosts []string, days int, now time.Time) (*Issued, error) {
	return a.issue(id, hosts, nil, days, now)
}

// IssueFor is Issue for a key the device made itself (pub, from its
// signing request): the Issued has no KeyPEM.
func (a *Authority) IssueFor(id Identity, hosts []string, pub ed25519.PublicKey, days int, now time.Time) (*Issued, error) {
	if len(pub) != ed25519.PublicKeySize {
		return nil, fmt.Errorf("%w: not an Ed25519 public key", ErrFields)
	}
	return a.issue(id, hosts, pub, days, now)
}

func (a *Authority) issue(id Identity, hosts []string, pub ed25519.PublicKey, days int, now time.Time) (*Issued, error) {
	if id.Org == "" {
		id.Org = a.Org
	}
	if id.Org != a.Org {
		return nil, fmt.Errorf("%w: org %q, this CA is %q", ErrFields, echo.Cut(id.Org), a.Org)
	}
	if err := id.Validate(); err != nil {
		return nil, err
	}
	if maxDays := min(MaxDays, int(a.Cert.NotAfter.Sub(now)/(24*time.Hour))); days < 1 || days > maxDays {
		return nil, fmt.Errorf("%w: %d days; the CA's certificate allows 1 to %d (it expires %s)", ErrValidity, days, max(maxDays, 0), a.Cert.NotAfter.UTC().Format("2006-01-02"))
	}
	notAfter := now.AddDate(0, 0, days)
	ips, names, err := parseHosts(id.Role, hosts)
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		Subject:     pkix.Name{CommonName: id.Name, Organization: []string{id.Org}, OrganizationalUnit: []string{string(id.Role)}},
		NotBefore:   now.Add(-backdateIssued),
		NotAfter:    notAfter,
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth},
		URIs:        []*url.URL{id.URI()},
	}
	if id.HasServerID {
		tmpl.URIs = append(tmpl.URIs, id.serverIDURI())
	}
	if id.Overlay.IsValid() {
		tmpl.URIs = append(tmpl.URIs, id.overlayURI())
	}
	tmpl.IPAddresses, tmpl.DNSNames = ips, names
	is, _, err := signFor(tmpl, a.Cert, a.Key, pub)
	if err != nil {
		return nil, err
	}
	if a.issuer {
		is.Chain = []*x509.Certificate{a.Cert}
		is.CertPEM = append(is.CertPEM, certToPEM(a.Cert.Raw)...)
	}
	return is, nil
}

// MaxHosts is the most TLS hosts a certificate carries.
const MaxHosts = 32

// dnsLabel is one label of a DNS name (RFC 1123: letters, digits and inner
// hyphens, 1 to 63 characters).
var dnsLabel = regexp.MustCompile(`^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$`)

// parseHosts checks the TLS hosts of a certificate. They belong only to
// roles that serve TLS: a key server. A client that accepted any org
// certificate carrying its address would talk to whoever holds one.
func parseHosts(role Role, hosts []string) ([]net.IP, []string, error) {
	if len(hosts) == 0 {
		return nil, nil, nil
	}
	if role != RoleKeyserver {
		return nil, nil, fmt.Errorf("%w: TLS hosts are for key servers (the only role that serves TLS), not a %s", ErrFields, role)
	}
	if len(hosts) > MaxHosts {
		return nil, nil, fmt.Errorf("%w: %d hosts, at most %d", ErrHost, len(hosts), MaxHosts)
	}
	var ips []net.IP
	var names []string
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			ips = append(ips, ip)
			continue
		}
		if !validDNSName(h) {
			return nil, nil, fmt.Errorf("%w: %q", ErrHost, echo.Cut(h))
		}
		names = append(names, strings.ToLower(h))
	}
	return ips, names, nil
}

func validDNSName(h string) bool {
	if h == "" || len(h) > 253 {
		return false
	}
	for _, l := range strings.Split(h, ".") {
		if !dnsLabel.MatchString(l) {
			return false
		}
	}
	return true
}

// WriteFiles writes NAME.crt (0644) and NAME.key (0600) into dir, refusing
// to overwrite either.
func (is *Issued) WriteFiles(dir, name string) error {
	return writePair(dir, filepath.Join(dir, name+".crt"), filepath.Join(dir, name+".key"), is.CertPEM, is.KeyPEM)
}

// Renew issues a new certificate and key for the identity and host names
// of old (which may be of another CA of the org: renewing with a new CA
// moves a device to it in a rollover).
func (a *Authority) Renew(old *x509.Certificate, days int, now time.Time) (*Issued, error) {
	id, err := IdentityOf(old)
	if err != nil {
		return nil, err
	}
	if id.Org != a.Org {
		return nil, fmt.Errorf("%w: the certificate is of org %q, this CA of %q", ErrIdentity, echo.Cut(id.Org), a.Org)
	}
	hosts := append([]string(nil), old.DNSNames...)
	for _, ip := range old.IPAddresses {
		hosts = append(hosts, ip.String())
	}
	return a.Issue(id, hosts, days, now)
}

// ReplaceFiles writes NAME.crt and NAME.key into dir in place of the ones
// there (ReplacePair).
func (is *Issued) ReplaceFiles(dir, name string) error {
	return ReplacePair(filepath.Join(dir, name+".crt"), filepath.Join(dir, name+".key"), is.CertPEM, is.KeyPEM)
}

// ReplacePair writes a certificate and its key in place of the ones at
// certPath and keyPath, each atomically (a new file renamed over the
// old), the key first, keeping the previous pair as .old files beside
// them.
func ReplacePair(certPath, keyPath string, certPEM, keyPEM []byte) error {
	for _, f := range []struct {
		path string
		data []byte
		mode os.FileMode
	}{{keyPath, keyPEM, 0o600}, {certPath, certPEM, 0o644}} {
		if _, err := os.Stat(f.path); err == nil {
			if err := os.Rename(f.path, f.path+".old"); err != nil {
				return err
			}
		}
		if err := WriteFileAtomic(f.path, f.data, f.mode); err != nil {
			return err
		}
	}
	return nil
}

// WriteFileAtomic writes data to path with mode: into a new file beside
// it, synced, then renamed over path, so that a crash leaves the old file
// or the new one, never a part.
func WriteFileAtomic(path string, data []byte, mode os.FileMode) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return err
	}
	err = tmp.Chmod(mode)
	if err == nil {
		_, err = tmp.Write(data)
	}
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), path)
	}
	if err != nil {
		os.Remove(tmp.Name())
	}
	return err
}

// Verify checks that cert chains to the authority and is valid at now, for
// client authentication, and returns its identity.
func (a *Authority) Verify(cert *x509.Certificate, now time.Time) (Identity, error) {
	return VerifyWith(a.Cert, cert, now)
}

// VerifyWith is Verify with only the root certificate (what a key server
// holds: not the CA key).
func VerifyWith(root, cert *x509.Certificate, now time.Time) (Identity, error) {
	r, err := NewRoots(root)
	if err != nil {
		return Identity{}, err
	}
	return r.Verify(cert, now)
}

// LoadCert reads one PEM certificate.
func LoadCert(path string) (*x509.Certificate, error) {
	b, err := fileread.Bounded(path, fileread.MaxPEM)
	if err != nil {
		return nil, err
	}
	block, _ := pem.Decode(b)
	switch {
	case block != nil && block.Type == "PRIVATE KEY":
		clear(block.Bytes)
		return nil, fmt.Errorf("%w: %s is a private key, not a certificate (the certificate is the .crt file beside it)", ErrPEM, path)
	case block == nil || block.Type != "CERTIFICATE":
		return nil, fmt.Errorf("%w: %s", ErrPEM, path)
	}
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrPEM, path, err)
	}
	return cert, nil
}

// LoadKey reads one PEM PKCS #8 Ed25519 private key.
func LoadKey(path string) (ed25519.PrivateKey, error) {
	b, err := fileread.Bounded(path, fileread.MaxPEM)
	if err != nil {
		return nil, err
	}
	defer clear(b)
	k, err := ParseKeyPEM(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return k, nil
}

// ParseKeyPEM parses one PEM PKCS #8 Ed25519 private key.
func ParseKeyPEM(b []byte) (ed25519.PrivateKey, error) {
	block, _ := pem.Decode(b)
	if block != nil && block.Type == "CERTIFICATE" {
		return nil, fmt.Errorf("%w: this is a certificate, not a private key (the key is the .key file beside it)", ErrPEM)
	}
	if block == nil || block.Type != "PRIVATE KEY" {
		return nil, ErrPEM
	}
	k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	clear(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrPEM, err)
	}
	priv, ok := k.(ed25519.PrivateKey)
	if !ok {
		return nil, fmt.Errorf("%w: not an Ed25519 key", ErrPEM)
	}
	return priv, nil
}

// sign makes a fresh Ed25519 key and a certificate for it from tmpl
// (given a serial number here), signed by parentKey as parent, or
// self-signed when parent is nil.
func sign(tmpl, parent *x509.Certificate, parentKey ed25519.PrivateKey) (*Issued, ed25519.PrivateKey, error) {
	return signFor(tmpl, parent, parentKey, nil)
}

// signFor is sign for the public key pub, or a fresh key pair when pub is
// nil (only then is a private key returned, and KeyPEM set).
func signFor(tmpl, parent *x509.Certificate, parentKey ed25519.PrivateKey, pub ed25519.PublicKey) (*Issued, ed25519.PrivateKey, error) {
	var priv ed25519.PrivateKey
	var err error
	if pub == nil {
		if pub, priv, err = ed25519.GenerateKey(rand.Reader); err != nil {
			return nil, nil, err
		}
	}
	if tmpl.SerialNumber, err = serial(); err != nil {
		return nil, nil, err
	}
	if parent == nil {
		parent, parentKey = tmpl, priv
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, parentKey)
	if err != nil {
		return nil, nil, fmt.Errorf("ca: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, nil, err
	}
	if priv == nil {
		return &Issued{Cert: cert, CertPEM: certToPEM(der)}, nil, nil
	}
	keyPEM, err := keyToPEM(priv)
	if err != nil {
		return nil, nil, err
	}
	return &Issued{Cert: cert, CertPEM: certToPEM(der), KeyPEM: keyPEM}, priv, nil
}

// refuseExisting fails if any of the paths exists.
func refuseExisting(paths ...string) error {
	for _, p := range paths {
		if _, err := os.Lstat(p); err == nil {
			return fmt.Errorf("%w: %s", ErrExists, p)
		}
	}
	return nil
}

// writePair writes a certificate (0644) and its key (0600) as new files in
// dir, never overwriting, and leaves neither behind if either fails.
func writePair(dir, certPath, keyPath string, certPEM, keyPEM []byte) error {
	if err := refuseExisting(certPath, keyPath); err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	if err := writeNew(keyPath, keyPEM, 0o600); err != nil {
		return err
	}
	if err := writeNew(certPath, certPEM, 0o644); err != nil {
		os.Remove(keyPath)
		return err
	}
	return nil
}

// serial is a random positive 127-bit serial number.
func serial() (*big.Int, error) {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, fmt.Errorf("ca: serial number: %w", err)
	}
	return n.Add(n, big.NewInt(1)), nil
}

func certToPEM(der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}

func keyToPEM(k ed25519.PrivateKey) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		return nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

// writeNew creates path with mode, failing if it exists.
func writeNew(path string, data []byte, mode os.FileMode) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
	if err != nil {
		if errors.Is(err, os.ErrExist) {
			return fmt.Errorf("%w: %s", ErrExists, path)
		}
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		os.Remove(path)
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		os.Remove(path)
		return err
	}
	return f.Close()
}
