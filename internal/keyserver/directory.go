package keyserver

import (
	"context"
	"crypto/ed25519"
	"crypto/x509"
	"fmt"
	"net/netip"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/enclavekeys/enclave/internal/api"
	"github.com/enclavekeys/enclave/internal/audit"
	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/registry"
)

// The endpoint directory (issue 22): servers register where their agents
// take data, signed with their certificates' keys; clients look a server
// up by its overlay address instead of being given --peer. The key
// service keeps and hands on entries it cannot forge: a client checks the
// server's signature and certificate itself.

// endpointSkew is how far a registration's time may be from the key
// service's clock.
const endpointSkew = 5 * time.Minute

// RegisterEndpoint implements api.KeyServiceServer (servers).
func (s *Service) RegisterEndpoint(ctx context.Context, req *api.RegisterEndpointRequest) (*api.RegisterEndpointReply, error) {
	const rpc = "RegisterEndpoint"
	c, err := s.authorize(ctx, rpc, ca.RoleServer)
	if err != nil {
		return nil, err
	}
	chain, err := x509.ParseCertificates(req.GetCert())
	if err != nil || len(chain) == 0 {
		return nil, status.Error(codes.InvalidArgument, "the entry carries no certificate")
	}
	if id, err := s.roots.Load().VerifyChain(chain, s.now()); err != nil || id != c.id || !id.Overlay.IsValid() {
		return nil, s.refuse(c, rpc, codes.PermissionDenied, "the entry's certificate is not a valid certificate of the caller's identity with an overlay address")
	}
	var data []netip.AddrPort
	for _, d := range req.GetData() {
		a, err := netip.ParseAddrPort(d)
		if err != nil {
			return nil, status.Errorf(codes.InvalidArgument, "data endpoint %q: want IP:PORT", d)
		}
		data = append(data, netip.AddrPortFrom(a.Addr().Unmap(), a.Port()))
	}
	at := req.GetAt().AsTime()
	if d := s.now().Sub(at); d > endpointSkew || d < -endpointSkew {
		return nil, status.Errorf(codes.InvalidArgument, "the entry is signed for %s, %s from the key service's clock", at.UTC().Format(time.RFC3339), d)
	}
	if pub, ok := chain[0].PublicKey.(ed25519.PublicKey); !ok || !ed25519.Verify(pub, registry.EndpointSigned(c.id.Name, data, at), req.GetSignature()) {
		return nil, status.Error(codes.InvalidArgument, "the entry's signature does not verify with the caller's certificate")
	}
	e := registry.Endpoint{Device: c.id.Name, Overlay: c.id.Overlay.Addr(), Cert: req.GetCert(), Data: data, At: at.UTC(), Signature: req.GetSignature()}
	if _, err := s.commit(ctx, c, rpc, &audit.IDs{Device: c.id.Name}, func(st *registry.State) ([]registry.RotationEvent, string, error) {
		return nil, fmt.Sprintf("%s registered its data endpoints %v", c.id.Name, data), st.SetEndpoint(e)
	}); err != nil {
		return nil, err
	}
	return &api.RegisterEndpointReply{}, nil
}

// ResolveEndpoint implements api.KeyServiceServer.
func (s *Service) ResolveEndpoint(ctx context.Context, req *api.ResolveEndpointRequest) (*api.EndpointEntry, error) {
	const rpc = "ResolveEndpoint"
	c, err := s.authorize(ctx, rpc, ca.RoleClient, ca.RoleServer, ca.RoleGateway, ca.RoleMonitor)
	if err != nil {
		return nil, err
	}
	a, err := netip.ParseAddr(req.GetOverlay())
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "overlay %q: want an address", req.GetOverlay())
	}
	if c.id.Enclave == 0 {
		return nil, s.refuse(c, rpc, codes.PermissionDenied, "a device whose certificate names no enclave resolves nothing: give it --peer")
	}
	// No server there, a revoked one, or one the caller may not reach:
	// one answer for all (anything else tells who exists where), the
	// cause audited, each refusal charged to the caller.
	notFound := func(cause string) (*api.EndpointEntry, error) {
		s.deny(c, rpc, "", nil, fmt.Sprintf("%s: %s", a, cause))
		return nil, status.Errorf(codes.NotFound, "no server at %s in the directory that %s may reach", a, c.id.Name)
	}
	e, ok := c.state.EndpointFor(a)
	var d registry.Device
	if ok {
		d, ok = c.state.Device(e.Device)
	}
	switch {
	case !ok:
		return notFound("no server registered there")
	case d.Revoked:
		return notFound(fmt.Sprintf("%s is revoked", d.Name))
	case !c.state.PairAllowed(registry.NewPair(d.Enclave, keys.EnclaveID(c.id.Enclave))):
		return notFound(fmt.Sprintf("pair %d-%d is not allowed: %s may not reach %s", d.Enclave, c.id.Enclave, c.id.Name, e.Device))
	}
	out := &api.EndpointEntry{Device: e.Device, Cert: e.Cert, At: timestamppb.New(e.At), Signature: e.Signature}
	for _, x := range e.Data {
		out.Data = append(out.Data, x.String())
	}
	return out, nil
}
