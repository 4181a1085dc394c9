package keyserver

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/enclavekeys/enclave/internal/api"
	"github.com/enclavekeys/enclave/internal/audit"
	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/registry"
)

// Enrollment (issue 22): an admin makes a join token for one device; the
// new host makes its key pair, sends a signing request with the token,
// and gets its certificate from the key service's issuing CA, with the
// device registered and the token used up in one audited change. The
// host's private key never leaves it; the org CA's key stays offline.

// Enrollment defaults and bounds.
const (
	DefaultIssueDays = 90
	DefaultTokenTTL  = time.Hour
	MaxTokenTTL      = 7 * 24 * time.Hour
	// tokenPrefix marks a join token, so that one pasted where another
	// secret goes is recognised.
	tokenPrefix = "enclave-join-"
)

// newJoinToken makes a join token's secret: 256 random bits.
func newJoinToken() string {
	var secret [32]byte
	rand.Read(secret[:])
	return tokenPrefix + base64.RawURLEncoding.EncodeToString(secret[:])
}

// tokenHash is what the registry keeps of a token: its SHA-256, in hex.
func tokenHash(token string) string {
	h := sha256.Sum256([]byte(token))
	return hex.EncodeToString(h[:])
}

// CreateJoinToken implements api.AdminServer.
func (s *Service) CreateJoinToken(ctx context.Context, req *api.CreateJoinTokenRequest) (*api.JoinTokenReply, error) {
	role, err := ca.ParseRole(req.GetRole())
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	id := ca.Identity{Org: s.org, Name: req.GetName(), Role: role, Enclave: keys.EnclaveID(req.GetEnclave())}
	if req.ServerId != nil {
		id.ServerID, id.HasServerID = keys.ServerID(req.GetServerId()), true
	}
	if o := req.GetOverlay(); o != "" {
		p, err := netip.ParsePrefix(o)
		if err != nil {
			return nil, status.Errorf(codes.InvalidArgument, "overlay %q: want an address with its prefix length, as 100.64.3.3/16", o)
		}
		id.Overlay = p
	}
	if err := id.Validate(); err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	ttl := time.Duration(req.GetTtlSeconds()) * time.Second
	if ttl == 0 {
		ttl = DefaultTokenTTL
	}
	if ttl < time.Minute || ttl > MaxTokenTTL {
		return nil, status.Errorf(codes.InvalidArgument, "a token lives 1 minute to %s, not %s", MaxTokenTTL, ttl)
	}
	token := newJoinToken()
	expires := s.now().Add(ttl)
	d := registry.Device{Name: id.Name, Role: role, Enclave: id.Enclave}
	if id.HasServerID {
		k := id.ServerID
		d.ServerID = &k
	}
	var overlay string
	_, err = s.apply(ctx, change{"CreateJoinToken", &audit.IDs{Device: id.Name}, func(st *registry.State) ([]registry.RotationEvent, string, error) {
		t := registry.JoinToken{Hash: tokenHash(token), Device: d, Expires: expires}
		if id.Overlay.IsValid() {
			t.Overlay = id.Overlay.String()
		}
		if err := st.AddToken(t, s.now()); err != nil {
			return nil, "", err
		}
		added, _ := st.Token(t.Hash)
		overlay = added.Overlay
		addr := ""
		if overlay != "" {
			addr = ", overlay " + overlay
		}
		return nil, fmt.Sprintf("join token for %s%s, until %s", id, addr, expires.Format(time.RFC3339)), nil
	}})
	if err != nil {
		return nil, err
	}
	msg := fmt.Sprintf("a join token for %s, single use, until %s", id, expires.Format(time.RFC3339))
	if overlay != "" {
		msg += "; its overlay address: " + overlay
	}
	if s.issuer.Load() == nil {
		msg += "; this key service has no issuing CA yet (start it with --issuer-cert and --issuer-key), so the token cannot be used here until it does"
	}
	return &api.JoinTokenReply{Token: token, Expires: timestamppb.New(expires), Message: msg, Overlay: overlay}, nil
}

// Join implements api.EnrollServer: the one call made without a client
// certificate.
func (s *Service) Join(ctx context.Context, req *api.JoinRequest) (*api.JoinReply, error) {
	const rpc = "Join"
	src, charge := joinSource(ctx)
	c := &caller{id: ca.Identity{Org: s.org, Name: "joining-host", Role: ca.RoleClient}, source: src, charge: charge}
	if !s.throttle.admit(charge, "join", rpc, s.clock.Now()) {
		s.metrics.refused(rpc)
		return nil, status.Error(codes.ResourceExhausted, throttleReason)
	}
	is, issErr := s.issuing()
	if errors.Is(issErr, errNoIssuer) {
		return nil, s.refuse(c, rpc, codes.FailedPrecondition, "this key service issues no certificates: start it with --issuer-cert and --issuer-key (an issuing CA the org CA signed)")
	}
	if !strings.HasPrefix(req.GetToken(), tokenPrefix) {
		return nil, s.refuse(c, rpc, codes.InvalidArgument, "not a join token (enclave admin token create makes them)")
	}
	pub, err := ca.ParseRequest(req.GetCsr())
	if err != nil {
		return nil, s.refuse(c, rpc, codes.InvalidArgument, err.Error())
	}
	// A certificate the devices would refuse is never handed out: the
	// issuing CA must chain to a CA this key service trusts now (after a
	// rollover, the old CA's issuer does not). Nothing is used up.
	switch {
	case errors.Is(issErr, errIssuerUntrusted):
		s.log.Error("a join was refused: the issuing CA does not chain to the CA bundle this key service trusts", "err", issErr,
			"what to do", "give the key server an issuing CA of the current CA (enclave ca issuer --ca CA), and send it SIGHUP")
		return nil, s.refuse(c, rpc, codes.FailedPrecondition, "this key service's issuing CA is not under the CA it trusts (a CA rollover left it behind): an admin must give it a new one; the token is not used up, try again later")
	case issErr != nil:
		return nil, status.Error(codes.FailedPrecondition, issErr.Error())
	}
	var issued *ca.Issued
	var joined ca.Identity
	key := hex.EncodeToString(pub)
	bound := false // the token was used with this key before
	_, err = s.commit(ctx, c, rpc, &audit.IDs{}, func(st *registry.State) ([]registry.RotationEvent, string, error) {
		if t, ok := st.Token(tokenHash(req.GetToken())); ok && t.Key == key {
			bound = true
		}
		t, err := st.UseToken(tokenHash(req.GetToken()), key, s.now())
		if err != nil {
			return nil, "", err
		}
		if bound { // a join answered again: at most joinsPerHour
			if wait := s.issuance.take("join:"+t.Hash, joinsPerHour, s.now()); wait > 0 {
				return nil, "", fmt.Errorf("%w: this token was answered %d times in the last hour: try again in %s", errIssuanceLimit, joinsPerHour, wait.Round(time.Second))
			}
		}
		id := ca.Identity{Org: s.org, Name: t.Device.Name, Role: t.Device.Role, Enclave: t.Device.Enclave}
		if t.Device.ServerID != nil {
			id.ServerID, id.HasServerID = *t.Device.ServerID, true
		}
		if t.Overlay != "" {
			if id.Overlay, err = netip.ParsePrefix(t.Overlay); err != nil {
				return nil, "", err
			}
		}
		if issued, err = is.issue(id, nil, pub, s.now()); err != nil {
			return nil, "", err
		}
		// The device is pinned to the certificate issued last: one issued
		// for the token before (another key, if an admin made a new
		// token) is refused by the key service from now on. Renewals
		// move the pin.
		if d, ok := st.Device(id.Name); ok {
			d.Fingerprint = ca.Fingerprint(issued.Cert)
			if err := st.SetDevice(d); err != nil {
				return nil, "", err
			}
		}
		joined = id
		c.id = ca.Identity{Org: s.org, Name: id.Name, Role: id.Role, Enclave: id.Enclave, ServerID: id.ServerID, HasServerID: id.HasServerID}
		c.charge = "" // a host that joined is itself from now on
		again := ""
		if bound {
			again = " again (the same key: an answer lost, or refused by the host)"
		}
		return nil, fmt.Sprintf("%s joined with a token from %s%s; certificate %s until %s; pending until the host confirms", id, src, again, ca.Fingerprint(issued.Cert), issued.Cert.NotAfter.UTC().Format(time.RFC3339)), nil
	})
	if err != nil {
		return nil, err
	}
	caPEM := is.bundlePEM()
	s.log.Info("a host joined", "identity", joined.String(), "from", src, "fingerprint", ca.Fingerprint(issued.Cert))
	return &api.JoinReply{CertificatePem: issued.CertPEM, CaPem: caPEM, Identity: joined.String()}, nil
}

// ConfirmJoin implements api.EnrollServer: a host that joined calls with
// the certificate it got, which proves it holds it; its device is
// enrolled (no longer pending) and its token used up.
func (s *Service) ConfirmJoin(ctx context.Context, _ *api.ConfirmJoinRequest) (*api.ConfirmJoinReply, error) {
	const rpc = "ConfirmJoin"
	c, err := s.identify(ctx, rpc)
	if err != nil {
		return nil, err
	}
	if !c.device.Pending {
		return &api.ConfirmJoinReply{}, nil // confirmed before: its answer was lost
	}
	key := ""
	if pub, ok := c.leaf.PublicKey.(ed25519.PublicKey); ok {
		key = hex.EncodeToString(pub)
	}
	_, err = s.commit(ctx, c, rpc, &audit.IDs{Device: c.id.Name}, func(st *registry.State) ([]registry.RotationEvent, string, error) {
		if _, err := st.ConfirmJoin(c.id.Name, key); err != nil {
			return nil, "", err
		}
		return nil, fmt.Sprintf("%s confirmed its join: enrolled", c.id), nil
	})
	if err != nil {
		return nil, err
	}
	s.log.Info("a join was confirmed", "identity", c.id.String())
	return &api.ConfirmJoinReply{WasPending: true}, nil
}

// joinAll is the throttle bucket that every source of refused joins is
// charged to as well.
const joinAll = "join:*"

// joinSource is a joining host's address, for the audit log, and the
// throttle bucket its refusals are charged to: its IPv4 address, or its
// IPv6 /64 (one host may hold a whole /64), never with the port.
func joinSource(ctx context.Context) (src, charge string) {
	p, ok := peer.FromContext(ctx)
	if !ok || p.Addr == nil {
		return "unknown", "join:unknown"
	}
	a := hostOf(p.Addr)
	if !a.IsValid() {
		return p.Addr.String(), "join:" + p.Addr.String()
	}
	return a.String(), "join:" + subnetOf(p.Addr)
}
