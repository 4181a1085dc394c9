// Package ca is Enclave's small certificate authority, in the spirit of
// nebula-cert: an Ed25519 org root that issues device certificates carrying
// the device's identity (org, name, role, enclave, server id) as URI SANs.
// The key service and the control protocol authenticate devices by these
// certificates and read their identity from them.
package ca

import (
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"net/url"
	"regexp"
	"strconv"
	"strings"

	"github.com/enclavekeys/enclave/internal/echo"
	"github.com/enclavekeys/enclave/internal/keys"
)

// Role is what a device is to Enclave.
type Role string

// The roles of DESIGN §2.
const (
	RoleServer    Role = "server"
	RoleClient    Role = "client"
	RoleGateway   Role = "gateway"
	RoleKeyserver Role = "keyserver"
	RoleMonitor   Role = "monitor"
	RoleAdmin     Role = "admin"
)

// Roles lists every role.
var Roles = []Role{RoleServer, RoleClient, RoleGateway, RoleKeyserver, RoleMonitor, RoleAdmin}

// Errors of identities.
var (
	ErrRole     = errors.New("ca: unknown role (want server, client, gateway, keyserver, monitor or admin)")
	ErrName     = errors.New("ca: a name is 1 to 64 letters, digits, '.', '-' or '_'")
	ErrOrg      = errors.New("ca: an org is 1 to 253 lowercase letters, digits, '.', '-' or '_' (a SPIFFE trust domain)")
	ErrIdentity = errors.New("ca: certificate carries no valid Enclave identity")
	ErrFields   = errors.New("ca: identity fields do not fit the role")
)

// ParseRole parses a role name.
func ParseRole(s string) (Role, error) {
	for _, r := range Roles {
		if string(r) == s {
			return r, nil
		}
	}
	return "", fmt.Errorf("%w: %q", ErrRole, echo.Cut(s))
}

// Identity is who a certificate says its holder is.
type Identity struct {
	Org  string
	Name string
	Role Role
	// Enclave is the device's enclave, 0 for none.
	Enclave keys.EnclaveID
	// ServerID is set for servers (HasServerID).
	ServerID    keys.ServerID
	HasServerID bool
	// Overlay is the device's overlay address and the prefix of its
	// overlay network (100.64.1.10/16), or the zero prefix for none. Agents
	// accept an SA's inner packets only from its peer's overlay address.
	Overlay netip.Prefix
}

var (
	nameRE = regexp.MustCompile(`^[A-Za-z0-9._-]{1,64}$`)
	// orgRE is a SPIFFE trust domain: dot-separated labels, none empty.
	orgRE = regexp.MustCompile(`^[a-z0-9_-]+(\.[a-z0-9_-]+)*$`)
)

// CheckName checks a device name: 1 to 64 letters, digits, '.', '-' or '_',
// and not "." or "..". The error is ErrName.
func CheckName(name string) error {
	if !nameRE.MatchString(name) || name == "." || name == ".." {
		return fmt.Errorf("%w: %q", ErrName, echo.Cut(name))
	}
	return nil
}

// Validate checks the fields and their fit with the role: a server has an
// enclave and a server id; only servers have server ids; monitors and admins
// stand outside enclaves.
func (id *Identity) Validate() error {
	if !validOrg(id.Org) {
		return fmt.Errorf("%w: %q", ErrOrg, echo.Cut(id.Org))
	}
	if err := CheckName(id.Name); err != nil {
		return err
	}
	if _, err := ParseRole(string(id.Role)); err != nil {
		return err
	}
	switch {
	case id.Role == RoleServer && (id.Enclave == 0 || !id.HasServerID):
		return fmt.Errorf("%w: a server needs an enclave and a server id", ErrFields)
	case id.Role != RoleServer && id.HasServerID:
		return fmt.Errorf("%w: only servers have server ids", ErrFields)
	case (id.Role == RoleMonitor || id.Role == RoleAdmin) && id.Enclave != 0:
		return fmt.Errorf("%w: a %s belongs to no enclave", ErrFields, id.Role)
	case id.Overlay.IsValid() && (id.Role == RoleAdmin || id.Role == RoleKeyserver):
		return fmt.Errorf("%w: a %s has no overlay address", ErrFields, id.Role)
	case id.Overlay.IsValid() && !validOverlay(id.Overlay):
		return fmt.Errorf("%w: overlay address %s", ErrFields, id.Overlay)
	}
	return nil
}

// validOverlay accepts a unicast address with its network's prefix length
// (at least /8 for IPv4, /16 for IPv6, so that the network is not the
// whole address space).
func validOverlay(p netip.Prefix) bool {
	a := p.Addr()
	min := 8
	if a.Is6() {
		min = 16
	}
	return p.Bits() >= min && !a.IsUnspecified() && !a.IsMulticast() && !a.IsLoopback() && a.Zone() == "" && a != p.Masked().Addr()
}

// overlayURI carries the overlay address beside the SPIFFE ID.
func (id *Identity) overlayURI() *url.URL {
	return &url.URL{Scheme: "urn", Opaque: "enclave:overlay:" + id.Overlay.String()}
}

// URI is the SPIFFE ID: spiffe://ORG/enclave/I/ROLE/NAME, or
// spiffe://ORG/ROLE/NAME outside enclaves.
func (id *Identity) URI() *url.URL {
	path := "/" + string(id.Role) + "/" + id.Name
	if id.Enclave != 0 {
		path = "/enclave/" + strconv.Itoa(int(id.Enclave)) + path
	}
	return &url.URL{Scheme: "spiffe", Host: id.Org, Path: path}
}

// serverIDURI carries the server id beside the SPIFFE ID.
func (id *Identity) serverIDURI() *url.URL {
	return &url.URL{Scheme: "urn", Opaque: "enclave:server-id:" + strconv.FormatUint(uint64(id.ServerID), 10)}
}

// String is the SPIFFE ID.
func (id Identity) String() string { return id.URI().String() }

// IdentityOf reads the identity from a certificate's URI SANs. It checks
// their form only; whether the certificate is trusted is the caller's
// (x509 verification against the org root).
func IdentityOf(cert *x509.Certificate) (Identity, error) {
	var id Identity
	found := false
	for _, u := range cert.URIs {
		switch {
		case u.Scheme == "spiffe":
			if found {
				return Identity{}, fmt.Errorf("%w: two SPIFFE IDs", ErrIdentity)
			}
			found = true
			if err := parseSPIFFE(&id, u); err != nil {
				return Identity{}, err
			}
		case u.Scheme == "urn" && strings.HasPrefix(u.Opaque, "enclave:server-id:"):
			k, err := keys.ParseServerID(strings.TrimPrefix(u.Opaque, "enclave:server-id:"))
			if err != nil || id.HasServerID {
				return Identity{}, fmt.Errorf("%w: bad server id %q", ErrIdentity, echo.Cut(u.Opaque))
			}
			id.ServerID, id.HasServerID = k, true
		case u.Scheme == "urn" && strings.HasPrefix(u.Opaque, "enclave:overlay:"):
			p, err := netip.ParsePrefix(strings.TrimPrefix(u.Opaque, "enclave:overlay:"))
			if err != nil || id.Overlay.IsValid() {
				return Identity{}, fmt.Errorf("%w: bad overlay address %q", ErrIdentity, echo.Cut(u.Opaque))
			}
			id.Overlay = p
		}
	}
	if !found {
		return Identity{}, fmt.Errorf("%w: no spiffe:// URI SAN", ErrIdentity)
	}
	if err := id.Validate(); err != nil {
		return Identity{}, fmt.Errorf("%w: %v", ErrIdentity, err)
	}
	return id, nil
}

func parseSPIFFE(id *Identity, u *url.URL) error {
	id.Org = u.Host
	parts := strings.Split(strings.TrimPrefix(u.Path, "/"), "/")
	if len(parts) == 4 && parts[0] == "enclave" {
		e, err := keys.ParseEnclaveID(parts[1])
		if err != nil {
			return fmt.Errorf("%w: %v", ErrIdentity, err)
		}
		id.Enclave = e
		parts = parts[2:]
	}
	if len(parts) != 2 || u.RawQuery != "" || u.Fragment != "" || u.User != nil {
		return fmt.Errorf("%w: %q is not spiffe://ORG[/enclave/I]/ROLE/NAME", ErrIdentity, echo.Cut(u.String()))
	}
	id.Role, id.Name = Role(parts[0]), parts[1]
	return nil
}

// Fingerprint is "sha256:" and the hex SHA-256 of the certificate's DER,
// the form the registry records devices by.
func Fingerprint(cert *x509.Certificate) string {
	sum := sha256.Sum256(cert.Raw)
	return "sha256:" + hex.EncodeToString(sum[:])
}

// validOrg reports whether s can be an org: a SPIFFE trust domain of at most
// 253 characters.
func validOrg(s string) bool {
	return len(s) <= 253 && orgRE.MatchString(s)
}
