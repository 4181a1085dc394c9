package registry

import (
	"errors"
	"fmt"

	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/echo"
)

// Errors of authorisation.
var (
	// ErrRevoked: the device is revoked.
	ErrRevoked = errors.New("registry: device revoked")
	// ErrMismatch: the certificate's identity differs from the registered
	// device (role, enclave, server id, or pinned certificate).
	ErrMismatch = errors.New("registry: certificate does not match the registered device")
)

// Authorize finds the registered device a verified certificate identity
// speaks for and checks it: registered, not revoked, same role, enclave and
// server id, and the pinned certificate if one is recorded. The key
// service calls it on every request, so a revocation takes effect at once.
func (s *State) Authorize(id ca.Identity, fingerprint string) (*Device, error) {
	d, ok := s.Device(id.Name)
	if !ok {
		return nil, fmt.Errorf("%w: device %q is not registered", ErrNotFound, echo.Cut(id.Name))
	}
	if d.Revoked {
		return nil, fmt.Errorf("%w: %q was revoked at %s", ErrRevoked, d.Name, d.RevokedAt.Format("2006-01-02T15:04:05Z"))
	}
	if d.Role != id.Role {
		return nil, fmt.Errorf("%w: certificate says role %s, registry says %s", ErrMismatch, id.Role, d.Role)
	}
	if d.Enclave != id.Enclave {
		return nil, fmt.Errorf("%w: certificate says enclave %d, registry says %d", ErrMismatch, id.Enclave, d.Enclave)
	}
	if (d.ServerID == nil) != !id.HasServerID || (d.ServerID != nil && *d.ServerID != id.ServerID) {
		return nil, fmt.Errorf("%w: server id differs", ErrMismatch)
	}
	if d.Overlay != "" && id.Overlay.String() != d.Overlay {
		return nil, fmt.Errorf("%w: certificate says overlay %s, registry says %s", ErrMismatch, id.Overlay, d.Overlay)
	}
	if d.Fingerprint != "" && d.Fingerprint != fingerprint && d.PrevFingerprint != fingerprint {
		return nil, fmt.Errorf("%w: the registry pins another certificate", ErrMismatch)
	}
	return &d, nil
}
