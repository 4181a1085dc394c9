package keyserver

import (
	"context"
	"crypto/ed25519"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"sync"
	"time"

	"google.golang.org/grpc/codes"

	"github.com/enclavekeys/enclave/internal/api"
	"github.com/enclavekeys/enclave/internal/audit"
	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/registry"
)

// Renewal (issue 32): a device renews its certificate with the key
// service, as it joined: a key it makes itself, a signing request, and a
// certificate from the issuing CA for exactly the identity of the
// certificate it calls with. Neither the org CA's key nor the device's
// private key travels; a joined host lives through any number of
// renewals without anyone at the CA.

// renewRoles may renew: the roles that may join (admins and key servers
// get their certificates from the org CA).
var renewRoles = []ca.Role{ca.RoleServer, ca.RoleClient, ca.RoleGateway, ca.RoleMonitor}

// Renew implements api.EnrollServer.
func (s *Service) Renew(ctx context.Context, req *api.RenewRequest) (*api.JoinReply, error) {
	const rpc = "Renew"
	c, err := s.authorize(ctx, rpc, renewRoles...)
	if err != nil {
		return nil, err
	}
	is, err := s.issuing()
	switch {
	case errors.Is(err, errNoIssuer):
		return nil, s.refuse(c, rpc, codes.FailedPrecondition, "this key service issues no certificates: start it with --issuer-cert and --issuer-key (an issuing CA the org CA signed), or renew with the CA's key (enclave cert renew --ca DIR)")
	case errors.Is(err, errIssuerUntrusted):
		return nil, s.refuse(c, rpc, codes.FailedPrecondition, "this key service's issuing CA is not under the CA it trusts (a CA rollover left it behind): an admin must give it a new one; try again later")
	case err != nil:
		return nil, s.refuse(c, rpc, codes.FailedPrecondition, err.Error())
	}
	pub, err := ca.ParseRequest(req.GetCsr())
	if err != nil {
		return nil, s.refuse(c, rpc, codes.InvalidArgument, err.Error())
	}
	if wait := s.issuance.take("renew:"+c.id.Name, renewsPerHour, s.now()); wait > 0 {
		return nil, s.refuse(c, rpc, codes.ResourceExhausted, fmt.Sprintf("%s renewed %d times in the last hour: the next renewal in %s", c.id.Name, renewsPerHour, wait.Round(time.Second)))
	}
	id := c.id
	issued, err := is.issue(id, nil, pub, s.now())
	if err != nil {
		return nil, s.refuse(c, rpc, codes.FailedPrecondition, fmt.Sprintf("issuing a certificate for %s: %v", id, err))
	}
	fp := ca.Fingerprint(issued.Cert)
	_, err = s.commit(ctx, c, rpc, &audit.IDs{Device: id.Name}, func(st *registry.State) ([]registry.RotationEvent, string, error) {
		d, ok := st.Device(id.Name)
		if !ok || d.Revoked || d.Pending {
			return nil, "", fmt.Errorf("%w: device %q is not enrolled", registry.ErrNotAllowed, id.Name)
		}
		caller := ca.Fingerprint(c.leaf)
		if d.Fingerprint != "" && d.Fingerprint != caller && d.PrevFingerprint != caller {
			return nil, "", fmt.Errorf("%w: %s renews only from its pinned certificate", registry.ErrMismatch, id.Name)
		}
		// The device is pinned to its new certificate (a device that was
		// not pinned is from now on: a copy of its pair cannot renew
		// itself unseen for ever). The one it called with is still taken
		// until the new one is first used, in case the answer is lost on
		// the way; a device renewing from that one again gets the pin
		// back to a certificate of its own, which a thief holding only
		// the older one cannot (it is forgotten at the new one's first
		// call).
		pin := "; pinned to it"
		d.PrevFingerprint, d.Fingerprint = caller, fp
		if err := st.SetDevice(d); err != nil {
			return nil, "", err
		}
		return nil, fmt.Sprintf("%s renewed its certificate: %s until %s%s", id, fp, issued.Cert.NotAfter.UTC().Format(time.RFC3339), pin), nil
	})
	if err != nil {
		return nil, err
	}
	caPEM := is.bundlePEM()
	s.log.Info("a device renewed its certificate", "identity", id.String(), "fingerprint", fp, "expires", issued.Cert.NotAfter.UTC().Format(time.RFC3339))
	return &api.JoinReply{CertificatePem: issued.CertPEM, CaPem: caPEM, Identity: id.String()}, nil
}

// RenewOwn issues this key server a new certificate for its identity id
// and host names from its issuing CA, for the key pub, audited: a key
// server renews itself as devices renew with it, with no CA key. id must
// be a key server's.
func (s *Service) RenewOwn(ctx context.Context, id ca.Identity, hosts []string, pub ed25519.PublicKey) (*ca.Issued, error) {
	if id.Role != ca.RoleKeyserver || id.Org != s.org {
		return nil, fmt.Errorf("keyserver: %s is not a key server of this org", id)
	}
	is, err := s.issuing()
	if err != nil {
		return nil, err
	}
	issued, err := is.issue(id, hosts, pub, s.now())
	if err != nil {
		return nil, err
	}
	c := &caller{id: id}
	fp := ca.Fingerprint(issued.Cert)
	if _, err := s.commit(ctx, c, "RenewOwn", &audit.IDs{Device: id.Name}, func(*registry.State) ([]registry.RotationEvent, string, error) {
		return nil, fmt.Sprintf("key server %s renewed its own certificate with its issuing CA: %s until %s", id, fp, issued.Cert.NotAfter.UTC().Format(time.RFC3339)), nil
	}); err != nil {
		return nil, err
	}
	return issued, nil
}

// Bounds on certificates issued to one device (an attacker holding its
// keys, or a bug, must not fill the store, the log and the world with
// them): renewals per device, and answers to one join token.
const (
	renewsPerHour = 3
	joinsPerHour  = 5
)

// errIssuanceLimit: more certificates asked for than the bounds allow.
var errIssuanceLimit = errors.New("keyserver: too many certificates asked for")

// issuance remembers, for a while, when certificates were issued to each
// device or token (in memory, per replica).
type issuance struct {
	mu sync.Mutex
	at map[string][]time.Time
}

// take records an issuance for key at now and returns 0, or, when key had
// max in the last hour already, how long until the next is allowed.
func (l *issuance) take(key string, max int, now time.Time) time.Duration {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.at == nil || len(l.at) > 100_000 {
		l.at = map[string][]time.Time{}
	}
	recent := l.at[key][:0]
	for _, t := range l.at[key] {
		if now.Sub(t) < time.Hour {
			recent = append(recent, t)
		}
	}
	if len(recent) >= max {
		l.at[key] = recent
		return recent[0].Add(time.Hour).Sub(now)
	}
	l.at[key] = append(recent, now)
	return 0
}

// Why the key service cannot issue certificates now.
var (
	errNoIssuer = errors.New("keyserver: no issuing CA (start the key server with --issuer-cert and --issuer-key)")
	// errIssuerUntrusted: the issuing CA's certificates would not verify
	// under the CA bundle in force.
	errIssuerUntrusted = fmt.Errorf("%w: the issuing CA does not chain to the CA bundle in force", registry.ErrNotAllowed)
)

// issuer is the issuing CA and the CA bundle in force, and how many days
// a certificate of it may last.
type issuer struct {
	ca    *ca.Authority
	roots *ca.Roots
	days  int
}

// issuing returns the issuing CA in force, checked: it chains to the CA
// bundle in force (a rollover may have left it behind) and has a day of
// life left, which bounds its certificates'.
func (s *Service) issuing() (*issuer, error) {
	a, roots := s.issuer.Load(), s.roots.Load()
	if a == nil {
		return nil, errNoIssuer
	}
	if _, err := a.Cert.Verify(x509.VerifyOptions{Roots: roots.Pool(), CurrentTime: s.now(), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return nil, fmt.Errorf("%w: %w", errIssuerUntrusted, err)
	}
	days := min(s.days, int(a.Cert.NotAfter.Sub(s.now())/(24*time.Hour)))
	if days < 1 {
		return nil, fmt.Errorf("the issuing CA expires %s: give the key server a new one (enclave ca issuer)", a.Cert.NotAfter.UTC().Format(time.RFC3339))
	}
	return &issuer{a, roots, days}, nil
}

// issue makes id a certificate for pub and checks that it verifies as the
// devices will check it: a certificate they would refuse is never handed
// out.
func (is *issuer) issue(id ca.Identity, hosts []string, pub ed25519.PublicKey, now time.Time) (*ca.Issued, error) {
	issued, err := is.ca.IssueFor(id, hosts, pub, is.days, now)
	if err != nil {
		return nil, err
	}
	if _, err := is.roots.VerifyChain(append([]*x509.Certificate{issued.Cert}, issued.Chain...), now); err != nil {
		return nil, fmt.Errorf("%w: %w", errIssuerUntrusted, err)
	}
	return issued, nil
}

// bundlePEM is the CA bundle the certificates were issued under, as the
// answer carries it.
func (is *issuer) bundlePEM() []byte {
	var b []byte
	for _, r := range is.roots.Certs() {
		b = append(b, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: r.Raw})...)
	}
	return b
}
