package registry

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"slices"
	"time"

	"github.com/enclavekeys/enclave/internal/echo"
)

// Endpoint is a directory entry (issue 22): where a server's agent takes
// data packets, registered by the server itself and signed with its
// certificate's key, so that a client can check the entry came from the
// server (the key service only keeps and hands it on).
type Endpoint struct {
	Device string `json:"device"`
	// Overlay is the server's overlay address, from its certificate: what
	// clients look it up by.
	Overlay netip.Addr `json:"overlay"`
	// Cert is the server's certificate (then its issuing CA's), DER, as
	// it registered.
	Cert []byte `json:"cert"`
	// Data are its underlay data endpoints (the control port is the next).
	Data []netip.AddrPort `json:"data"`
	// At is when the server signed the entry; a newer entry replaces it.
	At        time.Time `json:"at"`
	Signature []byte    `json:"signature"`
}

// MaxEndpoints bounds the data endpoints of one entry.
const MaxEndpoints = 8

// EndpointSigned is what a server signs for its directory entry:
// "enclave endpoint v1" ‖ 0 ‖ device name ‖ 0 ‖ at (Unix seconds, 8
// bytes) ‖ each endpoint (16 bytes of address, IPv4 mapped, 2 of port).
func EndpointSigned(device string, data []netip.AddrPort, at time.Time) []byte {
	b := append([]byte("enclave endpoint v1\x00"), device...)
	b = append(b, 0)
	b = binary.BigEndian.AppendUint64(b, uint64(at.Unix()))
	for _, d := range data {
		a := d.Addr().As16()
		b = append(b, a[:]...)
		b = binary.BigEndian.AppendUint16(b, d.Port())
	}
	return b
}

// SetEndpoint records a server's entry, replacing an older one; an entry
// not newer than the one held changes nothing.
func (s *State) SetEndpoint(e Endpoint) error {
	d, ok := s.Device(e.Device)
	if !ok || d.Revoked {
		return fmt.Errorf("%w: device %q (registered and not revoked)", ErrNotFound, echo.Cut(e.Device))
	}
	if len(e.Data) == 0 || len(e.Data) > MaxEndpoints {
		return fmt.Errorf("%w: %d data endpoints (1 to %d)", ErrInvalid, len(e.Data), MaxEndpoints)
	}
	for _, a := range e.Data {
		if !a.IsValid() || a.Port() == 0 || a.Port() == 65535 || a.Addr().IsUnspecified() || a.Addr().IsMulticast() {
			return fmt.Errorf("%w: data endpoint %v", ErrInvalid, a)
		}
	}
	if o, ok := s.Endpoints.Get(e.Device); !ok || e.At.After(o.At) {
		x := s.ix()
		if ok {
			x.endpoints.Delete(addrKey(o.Overlay) + o.Device)
		}
		s.Endpoints.Put(e)
		x.endpoints.Put(ref{k: addrKey(e.Overlay) + e.Device, name: e.Device})
	}
	return nil
}

func (e Endpoint) key() string { return e.Device }

// EndpointFor is the entry of the server at overlay address a.
func (s *State) EndpointFor(a netip.Addr) (Endpoint, bool) {
	for r := range withPrefix(&s.ix().endpoints, addrKey(a)) {
		if e, ok := s.Endpoints.Get(r.name); ok && e.Overlay == a {
			return e, true
		}
	}
	return Endpoint{}, false
}

// EndpointChanges lists the servers whose directory entry is new or newer
// in s than in prev.
func (s *State) EndpointChanges(prev *State) []string {
	var out []string
	check := func(e Endpoint) {
		if o, ok := prev.EndpointOf(e.Device); !ok || e.At.After(o.At) {
			out = append(out, e.Device)
		}
	}
	if s.ForkedFrom(prev) { // only the entries the change touched
		for name := range s.Endpoints.Changed() {
			if e, ok := s.Endpoints.Get(name); ok {
				check(e)
			}
		}
		slices.Sort(out)
		return out
	}
	for e := range s.Endpoints.All() {
		check(e)
	}
	return out
}

// EndpointOf is a device's entry.
func (s *State) EndpointOf(device string) (Endpoint, bool) { return s.Endpoints.Get(device) }
