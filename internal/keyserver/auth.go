package keyserver

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/registry"
)

// caller is an authenticated, authorised caller of one request.
type caller struct {
	id     ca.Identity
	device *registry.Device
	state  *registry.State // the registry as this request sees it
	// source and charge, for a caller without a certificate (Join): its
	// address, written into the audit entries, and the throttle bucket
	// its refusals are charged to (its host, not a shared stand-in).
	source, charge string
	// leaf is the certificate it called with (nil for Join).
	leaf *x509.Certificate
}

// throttleKey is the bucket c's refusals are charged to.
func (c *caller) throttleKey() string {
	if c.charge != "" {
		return c.charge
	}
	return c.id.String()
}

// identify reads the verified client certificate of the request's TLS
// connection (the TLS layer has already checked it chains to the org root)
// and checks it against the registry on every call, so that revocation
// takes effect at once.
func (s *Service) identify(ctx context.Context, rpc string) (*caller, error) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return nil, status.Error(codes.Unauthenticated, "no peer information")
	}
	info, ok := p.AuthInfo.(credentials.TLSInfo)
	if !ok {
		return nil, status.Error(codes.Unauthenticated, "no TLS connection came with the call")
	}
	return s.identifyTLS(ctx, &info.State, rpc)
}

// identifyTLS is identify for a connection whose TLS state is cs (the
// watch transport's).
func (s *Service) identifyTLS(ctx context.Context, cs *tls.ConnectionState, rpc string) (*caller, error) {
	if len(cs.VerifiedChains) == 0 || len(cs.VerifiedChains[0]) == 0 {
		return nil, status.Error(codes.Unauthenticated, "no client certificate this key server trusts came with the call: --cert must be issued by the org CA it trusts (one of another CA is not even sent)")
	}
	// The TLS handshake verified the chain to the org root; what can change
	// during a connection's life is time (expiry) and the registry.
	leaf := cs.VerifiedChains[0][0]
	if now := s.clock.Now(); now.Before(leaf.NotBefore) || now.After(leaf.NotAfter) {
		return nil, status.Errorf(codes.Unauthenticated, "certificate not valid now (valid %s to %s)", leaf.NotBefore.UTC().Format(time.RFC3339), leaf.NotAfter.UTC().Format(time.RFC3339))
	}
	id, err := ca.IdentityOf(leaf)
	if err != nil || id.Org != s.org {
		return nil, status.Errorf(codes.Unauthenticated, "certificate carries no identity of org %s: %v", s.org, err)
	}
	// The CA bundle may have changed since the connection was made (a
	// rollover's last step): a certificate of a CA no longer in it is
	// refused on connections already up too. The handshake verified the
	// chain; whether its root is still in the bundle is all that can
	// have changed (no signature checked again per call).
	if chain := cs.VerifiedChains[0]; !s.roots.Load().Holds(chain[len(chain)-1]) {
		return nil, status.Error(codes.Unauthenticated, "certificate not trusted by the CA bundle in force (a CA rollover retired its CA?)")
	}
	if !s.throttle.admit(id.String(), string(id.Role), rpc, s.clock.Now()) {
		s.metrics.refused(rpc)
		return nil, status.Error(codes.ResourceExhausted, throttleReason)
	}
	st, err := s.store.View(ctx)
	if err != nil {
		return nil, status.Errorf(codes.Unavailable, "registry: %v", err)
	}
	d, err := st.Authorize(id, ca.Fingerprint(leaf))
	if errors.Is(err, registry.ErrNotFound) && id.Role == ca.RoleAdmin {
		// Admins are vouched for by the org CA itself (whose key is kept
		// offline): that is how the first admin reaches an empty registry.
		// An admin recorded in the registry is checked and can be revoked
		// like any device.
		d, err = &registry.Device{Name: id.Name, Role: ca.RoleAdmin}, nil
	}
	if err == nil && d.Pending && rpc != "ConfirmJoin" {
		// Enrolled by a token, but its host never said it got its
		// certificate: nothing but the confirmation until it does.
		err = fmt.Errorf("the join of %q is not confirmed yet: run its enclave join command again (the same token and key confirm it)", id.Name)
	}
	if err != nil {
		s.deny(&caller{id: id}, rpc, "", nil, err.Error())
		return nil, status.Errorf(codes.PermissionDenied, "%s: %v", id, err)
	}
	fp := ca.Fingerprint(leaf)
	if d.PrevFingerprint != "" && d.Fingerprint == fp {
		// The renewed certificate's first call: the one it replaced is
		// refused from now on (a copy of it could otherwise renew and
		// take the device's pin).
		s.retirePrev(ctx, id.Name, fp)
	}
	s.noteSeen(id.Name, s.clock.Now(), leaf.NotAfter)
	return &caller{id: id, device: d, state: st, leaf: leaf}, nil
}

// retirePrev forgets device name's previous certificate, now that the one
// pinned (fp) is in use. A failure is left for the next call to try.
func (s *Service) retirePrev(ctx context.Context, name, fp string) {
	_, err := s.store.Update(ctx, func(st *registry.State) error {
		if d, ok := st.Device(name); ok && d.Fingerprint == fp {
			d.PrevFingerprint = ""
			return st.SetDevice(d)
		}
		return nil
	})
	if err != nil {
		s.log.Warn("forgetting a renewed device's previous certificate", "device", name, "err", err)
	}
}

// purposes says, for each RPC, who may call it and what for, in words for
// the refusal message ("laptop is a client; only servers fetch server
// keys"). An RPC missing here falls back to listing the roles.
var purposes = map[string]string{
	"GetServerKeys":              "only servers fetch server keys",
	"GetPairKeys":                "only gateways, monitors and enclave key servers fetch pair keys",
	"AuthorizeDirectKeyExchange": "only servers and key servers ask whether a gateway may be handed SA keys",
	"Exchange":                   "only enclave key servers agree pair keys",
	"Status":                     "only admins read the registry",
	"Renew":                      "admins and key servers renew with the org CA's key (enclave cert renew --ca DIR)",
}

// require refuses callers whose role is not among roles.
func (s *Service) require(c *caller, rpc string, roles ...ca.Role) error {
	for _, r := range roles {
		if c.id.Role == r {
			return nil
		}
	}
	why, ok := purposes[rpc]
	switch {
	case ok:
	case len(roles) == 1 && roles[0] == ca.RoleAdmin:
		why = "only admins change the registry"
	default:
		why = fmt.Sprintf("only %s may call %s", roleList(roles), rpc)
	}
	reason := fmt.Sprintf("%s is %s %s; %s", c.id.Name, article(string(c.id.Role)), c.id.Role, why)
	s.deny(c, rpc, "", nil, reason)
	return status.Error(codes.PermissionDenied, reason)
}

// roleList is "servers", "servers and key servers", ...
func roleList(roles []ca.Role) string {
	names := make([]string, len(roles))
	for i, r := range roles {
		names[i] = string(r) + "s"
	}
	return strings.Join(names, " and ")
}

// article is "a" or "an" for a role name.
func article(word string) string {
	if word != "" && strings.ContainsRune("aeiou", rune(word[0])) {
		return "an"
	}
	return "a"
}

// authorize is identify followed by require: the common opening of an RPC.
func (s *Service) authorize(ctx context.Context, rpc string, roles ...ca.Role) (*caller, error) {
	c, err := s.identify(ctx, rpc)
	if err != nil {
		return nil, err
	}
	if err := s.require(c, rpc, roles...); err != nil {
		return nil, err
	}
	return c, nil
}
