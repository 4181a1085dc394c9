package registry

import (
	"fmt"
	"slices"
	"time"

	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/echo"
)

// JoinToken lets one new host enroll as one device (DESIGN's enrollment;
// issue 22): an admin makes it, the host presents it once with a signing
// request for a key it made itself, and the key service registers the
// device and issues its certificate in one transaction. Only the token's
// hash is stored; it is single-use, expires, and is bound to the identity
// it was made for.
type JoinToken struct {
	// Hash is the hex SHA-256 of the token's secret.
	Hash string `json:"hash"`
	// Device is the device it registers (name, role, enclave, server id).
	Device Device `json:"device"`
	// Overlay is the overlay address and prefix its certificate carries
	// (agents need one), empty for none.
	Overlay string    `json:"overlay,omitempty"`
	Expires time.Time `json:"expires"`
	// By is the admin who made it.
	By string `json:"by"`
	// Key is the public key (hex) of the first signing request that came
	// with the token: it is bound to that key from then on, so that a
	// host whose answer was lost asks again with the same request and
	// gets its certificate again, and nobody else can use the token.
	Key string `json:"key,omitempty"`
}

// Errors of join tokens.
var (
	ErrTokenUnknown = fmt.Errorf("%w: no such join token (never made, used already, or withdrawn)", ErrNotFound)
	ErrTokenExpired = fmt.Errorf("%w: the join token expired (make another: admin token create)", ErrNotFound)
)

// joinRoles are the roles a host may join as: admins and key servers come
// from the org CA itself.
var joinRoles = []ca.Role{ca.RoleServer, ca.RoleClient, ca.RoleGateway, ca.RoleMonitor}

// Joins reports whether a device of role r may join with a token.
func Joins(r ca.Role) bool { return slices.Contains(joinRoles, r) }

// AddToken records a join token for a device that is not registered yet
// (nor promised to another token), after dropping expired tokens.
func (s *State) AddToken(t JoinToken, now time.Time) error {
	s.pruneTokens(now)
	d := t.Device
	if !slices.Contains(joinRoles, d.Role) {
		return fmt.Errorf("%w: a %s cannot join with a token (admins and key servers get their certificates from the org CA)", ErrInvalid, d.Role)
	}
	if !t.Expires.After(now) {
		return fmt.Errorf("%w: the token would expire before it is made", ErrInvalid)
	}
	if t.Hash == "" || s.Tokens.Has(t.Hash) {
		return fmt.Errorf("%w: a join token needs a hash of its own", ErrInvalid)
	}
	// A device whose join was never confirmed gets a new token: the old
	// one goes, and the device is held by the new one. One registered
	// awaiting its host (AwaitJoin) stays registered, its grant with it,
	// if the new token is for the same identity.
	if o, ok := s.Device(d.Name); ok && o.Pending && !o.Revoked && !o.Removed {
		if o.JoinKey == "" && sameIdentity(o, d) {
			s.WithdrawToken(d.Name)
			if t.Overlay == "" {
				t.Overlay = o.Overlay
			}
			if t.Overlay != o.Overlay {
				return fmt.Errorf("%w: device %q awaits its host with overlay %s: its new token keeps it", ErrInvalid, echo.Cut(d.Name), o.Overlay)
			}
			s.putToken(t)
			return nil
		}
		if _, granted := s.Grant(d.Name); granted {
			return fmt.Errorf("%w: device %q has a grant: revoke its grant before making it a token of another identity", ErrInvalid, echo.Cut(d.Name))
		}
		s.WithdrawToken(d.Name)
		s.deleteDevice(d.Name)
	}
	// The checks a registration makes: the token is only good if the
	// device could be added.
	if err := s.couldAdd(d); err != nil {
		return err
	}
	ov, err := s.claimOverlay(d.Name, d.Role, d.Enclave, t.Overlay)
	if err != nil {
		return err
	}
	t.Overlay = ov
	if o, ok := s.tokenOf(d.Name); ok {
		return fmt.Errorf("%w: a join token for %q exists already (until %s)", ErrExists, echo.Cut(d.Name), o.Expires.UTC().Format(time.RFC3339))
	}
	if d.ServerID != nil {
		for r := range s.serverIDHolders(uint32(*d.ServerID)) {
			if r.token {
				return fmt.Errorf("%w: server id %d is promised to %q's join token", ErrExists, *d.ServerID, r.name)
			}
		}
	}
	s.putToken(t)
	return nil
}

// ErrTokenBound: a token presented with a key other than the one it was
// first used with.
var ErrTokenBound = fmt.Errorf("%w: this join token was used with another key", ErrMismatch)

// UseToken enrolls with the token whose hash is hash, for the public key
// key (hex): on first use the token is bound to key and the device it was
// made for is registered, pending; used again with the same key (the
// host's answer was lost, or its certificate did not verify there), it
// answers the same device again. The token stays until the host confirms
// (ConfirmJoin) or it expires; the pending device stays after that.
func (s *State) UseToken(hash, key string, now time.Time) (JoinToken, error) {
	t, ok := s.Tokens.Get(hash)
	if !ok {
		return JoinToken{}, ErrTokenUnknown
	}
	switch {
	case !now.Before(t.Expires):
		s.deleteToken(hash)
		return JoinToken{}, fmt.Errorf("%w at %s", ErrTokenExpired, t.Expires.UTC().Format(time.RFC3339))
	case key == "":
		return JoinToken{}, fmt.Errorf("%w: no key", ErrInvalid)
	case t.Key == key:
		return t, nil
	case t.Key != "":
		return JoinToken{}, ErrTokenBound
	}
	d := t.Device
	d.Pending, d.Overlay, d.JoinKey = true, t.Overlay, key
	if o, ok := s.Device(d.Name); ok && o.Awaiting() && sameIdentity(o, d) {
		o.JoinKey = key // registered awaiting this join (AwaitJoin)
		s.putDevice(o)
	} else if err := s.AddDevice(d); err != nil {
		return JoinToken{}, err
	}
	t.Key = key
	s.putToken(t)
	return t, nil
}

// AwaitJoin records the join token t and registers its device now,
// pending, awaiting its host (a device an org file adds, issue 34): its
// grant and the sight assertions count it before the host joins, and
// UseToken binds it to the host's key. A token made again for it
// (AddToken) replaces t and keeps the device.
func (s *State) AwaitJoin(t JoinToken, now time.Time) error {
	if err := s.AddToken(t, now); err != nil {
		return err
	}
	added, _ := s.Tokens.Get(t.Hash)
	d := added.Device
	d.Pending, d.Overlay, d.JoinKey = true, added.Overlay, ""
	if err := s.AddDevice(d); err != nil {
		s.deleteToken(t.Hash)
		return err
	}
	return nil
}

// Awaiting reports whether d is registered awaiting its host's join
// (AwaitJoin): pending, and no host has joined with its token yet.
func (d *Device) Awaiting() bool {
	return d.Pending && d.JoinKey == "" && !d.Revoked && !d.Removed
}

// sameIdentity reports whether a and b are the same device identity
// (role, enclave, server id).
func sameIdentity(a, b Device) bool {
	return a.Role == b.Role && a.Enclave == b.Enclave &&
		(a.ServerID == nil) == (b.ServerID == nil) && (a.ServerID == nil || *a.ServerID == *b.ServerID)
}

// ConfirmJoin marks the pending device name enrolled: its host holds the
// certificate issued for the key its token was bound to (key, hex: the
// caller's). Its token, if still there, is used up. It reports whether the
// device was pending (a second confirmation changes nothing).
func (s *State) ConfirmJoin(name, key string) (bool, error) {
	d, ok := s.Device(name)
	if !ok {
		return false, fmt.Errorf("%w: device %q", ErrNotFound, echo.Cut(name))
	}
	if !d.Pending {
		return false, nil
	}
	// Only the host that joined with the device's token confirms: a
	// device awaiting its host (no join yet) is confirmed by nobody, so
	// that an old certificate of its name cannot take it over.
	if d.JoinKey == "" || d.JoinKey != key {
		return false, fmt.Errorf("%w: this certificate is not for the key the join was bound to", ErrMismatch)
	}
	d.Pending, d.JoinKey = false, ""
	s.putDevice(d)
	s.WithdrawToken(name)
	return true, nil
}

// Token returns the join token whose hash is hash.
func (s *State) Token(hash string) (JoinToken, bool) { return s.Tokens.Get(hash) }

func (t JoinToken) key() string { return t.Hash }

// WithdrawToken removes the join token made for device name, if there is
// one, and reports whether there was.
func (s *State) WithdrawToken(name string) bool {
	var gone []string
	for r := range withPrefix(&s.ix().tokens, name+"/") {
		gone = append(gone, r.hash)
	}
	for _, h := range gone {
		s.deleteToken(h)
	}
	return len(gone) > 0
}

// pruneTokens drops the tokens expired at now.
func (s *State) pruneTokens(now time.Time) {
	for _, h := range s.expiredTokens(now) {
		s.deleteToken(h)
	}
}
