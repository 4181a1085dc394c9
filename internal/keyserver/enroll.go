package keyserver

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/pem"
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
	var secret [32]byte
	rand.Read(secret[:])
	token := tokenPrefix + base64.RawURLEncoding.EncodeToString(secret[:])
	expires := s.now().Add(ttl)
	d := registry.Device{Name: id.Name, Role: role, Enclave: id.Enclave}
	if id.HasServerID {
		k := id.ServerID
		d.ServerID = &k
	}
	_, err = s.apply(ctx, change{"CreateJoinToken", &audit.IDs{Device: id.Name}, func(st *registry.State) ([]registry.RotationEvent, string, error) {
		t := registry.JoinToken{Hash: tokenHash(token), Device: d, Expires: expires}
		if id.Overlay.IsValid() {
			t.Overlay = id.Overlay.String()
		}
		if err := st.AddToken(t, s.now()); err != nil {
			return nil, "", err
		}
		return nil, fmt.Sprintf("join token for %s, until %s", id, expires.Format(time.RFC3339)), nil
	}})
	if err != nil {
		return nil, err
	}
	msg := fmt.Sprintf("a join token for %s, single use, until %s", id, expires.Format(time.RFC3339))
	if s.issuer == nil {
		msg += "; this key service has no issuing CA yet (start it with --issuer-cert and --issuer-key), so the token cannot be used here until it does"
	}
	return &api.JoinTokenReply{Token: token, Expires: timestamppb.New(expires), Message: msg}, nil
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
	if s.issuer == nil {
		return nil, s.refuse(c, rpc, codes.FailedPrecondition, "this key service issues no certificates: start it with --issuer-cert and --issuer-key (an issuing CA the org CA signed)")
	}
	if !strings.HasPrefix(req.GetToken(), tokenPrefix) {
		return nil, s.refuse(c, rpc, codes.InvalidArgument, "not a join token (enclave admin token create makes them)")
	}
	pub, err := ca.ParseRequest(req.GetCsr())
	if err != nil {
		return nil, s.refuse(c, rpc, codes.InvalidArgument, err.Error())
	}
	// The issuing CA's own life bounds its certificates'.
	days := min(s.days, int(s.issuer.Cert.NotAfter.Sub(s.now())/(24*time.Hour)))
	if days < 1 {
		return nil, status.Errorf(codes.FailedPrecondition, "the issuing CA expires %s: give the key server a new one (enclave ca issuer)", s.issuer.Cert.NotAfter.UTC().Format(time.RFC3339))
	}
	var issued *ca.Issued
	var joined ca.Identity
	_, err = s.commit(ctx, c, rpc, &audit.IDs{}, func(st *registry.State) ([]registry.RotationEvent, string, error) {
		t, err := st.TakeToken(tokenHash(req.GetToken()), s.now())
		if err != nil {
			return nil, "", err
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
		if issued, err = s.issuer.IssueFor(id, nil, pub, days, s.now()); err != nil {
			return nil, "", err
		}
		joined = id
		c.id = ca.Identity{Org: s.org, Name: id.Name, Role: id.Role, Enclave: id.Enclave, ServerID: id.ServerID, HasServerID: id.HasServerID}
		c.charge = "" // a host that joined is itself from now on
		return nil, fmt.Sprintf("%s joined with a token from %s; certificate %s until %s", id, src, ca.Fingerprint(issued.Cert), issued.Cert.NotAfter.UTC().Format(time.RFC3339)), nil
	})
	if err != nil {
		return nil, err
	}
	var caPEM []byte
	for _, r := range s.roots.Certs() {
		caPEM = append(caPEM, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: r.Raw})...)
	}
	s.log.Info("a host joined", "identity", joined.String(), "from", src, "fingerprint", ca.Fingerprint(issued.Cert))
	return &api.JoinReply{CertificatePem: issued.CertPEM, CaPem: caPEM, Identity: joined.String()}, nil
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
	ap, err := netip.ParseAddrPort(p.Addr.String())
	if err != nil {
		return p.Addr.String(), "join:" + p.Addr.String()
	}
	a := ap.Addr().Unmap().WithZone("")
	if a.Is4() {
		return a.String(), "join:" + a.String()
	}
	return a.String(), "join:" + netip.PrefixFrom(a, 64).Masked().String()
}
