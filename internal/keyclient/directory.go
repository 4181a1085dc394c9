package keyclient

import (
	"crypto/ed25519"
	"crypto/x509"
	"errors"
	"fmt"
	"net/netip"
	"time"

	"github.com/enclavekeys/enclave/internal/api"
	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/registry"
)

// ErrEntry: a directory entry that does not check out (not the server's
// own, not for that address, badly signed, stale).
var ErrEntry = errors.New("keyclient: the directory entry does not check out")

// ErrStale: a directory entry signed too long ago (or in the future),
// which a key service could otherwise keep serving for ever after the
// server moved. A stale entry is no entry: the client finds no route to
// the server until it registers again (servers register every 10
// minutes, and within 30 seconds of their key service coming back).
var ErrStale = errors.New("stale")

const (
	// MaxEndpointAge is how old a server's signature on its entry may be:
	// three of its re-registrations missed.
	MaxEndpointAge = 30 * time.Minute
	// endpointAhead is how far in the future an entry may be signed
	// (clocks differ).
	endpointAhead = 5 * time.Minute
)

// VerifyEndpoint checks a directory entry the key service handed on for
// the server at overlay address dst: its certificate chains to roots at
// now, is a server's and carries dst, and its key signed the entry. It
// returns the data endpoints and the server's identity. A key service
// cannot make an entry pass that the server did not sign.
func VerifyEndpoint(roots *ca.Roots, e *api.EndpointEntry, dst netip.Addr, now time.Time) ([]netip.AddrPort, ca.Identity, error) {
	chain, err := x509.ParseCertificates(e.GetCert())
	if err != nil || len(chain) == 0 {
		return nil, ca.Identity{}, fmt.Errorf("%w: its certificate: %v", ErrEntry, err)
	}
	id, err := roots.VerifyChain(chain, now)
	if err != nil {
		return nil, id, fmt.Errorf("%w: %v", ErrEntry, err)
	}
	if id.Role != ca.RoleServer || !id.Overlay.IsValid() || id.Overlay.Addr() != dst || id.Name != e.GetDevice() {
		return nil, id, fmt.Errorf("%w: it is %s's, not the server at %s", ErrEntry, id, dst)
	}
	var data []netip.AddrPort
	for _, d := range e.GetData() {
		a, err := netip.ParseAddrPort(d)
		if err != nil {
			return nil, id, fmt.Errorf("%w: endpoint %q", ErrEntry, d)
		}
		data = append(data, netip.AddrPortFrom(a.Addr().Unmap(), a.Port()))
	}
	pub, ok := chain[0].PublicKey.(ed25519.PublicKey)
	if !ok || len(data) == 0 || !ed25519.Verify(pub, registry.EndpointSigned(id.Name, data, e.GetAt().AsTime()), e.GetSignature()) {
		return nil, id, fmt.Errorf("%w: not signed by %s", ErrEntry, id.Name)
	}
	switch at := e.GetAt().AsTime(); {
	case now.Sub(at) > MaxEndpointAge:
		return nil, id, fmt.Errorf("%w: %w: %s signed it at %s, %s ago (over %s): the server has not registered since; is it running and reaching the key service?",
			ErrEntry, ErrStale, id.Name, at.UTC().Format(time.RFC3339), now.Sub(at).Round(time.Second), MaxEndpointAge)
	case at.Sub(now) > endpointAhead:
		return nil, id, fmt.Errorf("%w: %w: %s signed it for %s, %s ahead of this host's clock",
			ErrEntry, ErrStale, id.Name, at.UTC().Format(time.RFC3339), at.Sub(now).Round(time.Second))
	}
	return data, id, nil
}
