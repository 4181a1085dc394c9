package registry

import (
	"errors"
	"testing"
	"time"

	"github.com/enclavekeys/enclave/internal/ca"
)

// TestJoinTokens: a token is made only for a device that could be
// registered, once per name and server id; taking it registers the device
// and removes it (single use); an expired one registers nothing.
func TestJoinTokens(t *testing.T) {
	s := org(t)
	tok := JoinToken{Hash: "aa", Device: Device{Name: "web2", Role: ca.RoleServer, Enclave: 3, ServerID: sid(302)}, Overlay: "100.64.3.3/16", Expires: t0.Add(time.Hour)}
	if err := s.AddToken(tok, t0); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name string
		t    JoinToken
		want error
	}{
		{"same name", JoinToken{Hash: "bb", Device: Device{Name: "web2", Role: ca.RoleClient, Enclave: 7}, Expires: t0.Add(time.Hour)}, ErrExists},
		{"same server id", JoinToken{Hash: "bb", Device: Device{Name: "web3", Role: ca.RoleServer, Enclave: 3, ServerID: sid(302)}, Expires: t0.Add(time.Hour)}, ErrExists},
		{"a registered name", JoinToken{Hash: "bb", Device: Device{Name: "laptop", Role: ca.RoleClient, Enclave: 7}, Expires: t0.Add(time.Hour)}, ErrExists},
		{"an admin", JoinToken{Hash: "bb", Device: Device{Name: "bob", Role: ca.RoleAdmin}, Expires: t0.Add(time.Hour)}, ErrInvalid},
		{"no such enclave", JoinToken{Hash: "bb", Device: Device{Name: "x", Role: ca.RoleClient, Enclave: 9}, Expires: t0.Add(time.Hour)}, ErrNotFound},
		{"already expired", JoinToken{Hash: "bb", Device: Device{Name: "y", Role: ca.RoleClient, Enclave: 7}, Expires: t0}, ErrInvalid},
	} {
		if err := s.AddToken(c.t, t0); !errors.Is(err, c.want) {
			t.Errorf("%s: %v, want %v", c.name, err, c.want)
		}
	}
	if _, err := s.UseToken("zz", "k1", t0); !errors.Is(err, ErrTokenUnknown) {
		t.Fatalf("an unknown token: %v", err)
	}
	got, err := s.UseToken("aa", "k1", t0.Add(time.Minute))
	if err != nil || got.Device.Name != "web2" || got.Overlay != "100.64.3.3/16" {
		t.Fatalf("use: %+v %v", got, err)
	}
	if d, ok := s.Device("web2"); !ok || d.Role != ca.RoleServer || *d.ServerID != 302 || !d.Pending {
		t.Fatalf("the device was not registered pending: %+v", d)
	}
	// The answer was lost: the same key again gets the same device; any
	// other key is refused.
	if again, err := s.UseToken("aa", "k1", t0.Add(2*time.Minute)); err != nil || again.Device.Name != "web2" {
		t.Fatalf("the same token and key again: %+v %v", again, err)
	}
	if _, err := s.UseToken("aa", "k2", t0.Add(2*time.Minute)); !errors.Is(err, ErrTokenBound) {
		t.Fatalf("the token with another key: %v", err)
	}
	if ok, err := s.ConfirmJoin("web2", "k1"); !ok || err != nil {
		t.Fatalf("confirm: %v %v", ok, err)
	}
	if d, _ := s.Device("web2"); d.Pending {
		t.Fatal("still pending after the confirmation")
	}
	if ok, err := s.ConfirmJoin("web2", "k1"); ok || err != nil {
		t.Fatalf("a second confirmation: %v %v", ok, err)
	}
	if _, err := s.UseToken("aa", "k1", t0.Add(3*time.Minute)); !errors.Is(err, ErrTokenUnknown) {
		t.Fatalf("a token used after its join was confirmed: %v", err)
	}
	late := JoinToken{Hash: "cc", Device: Device{Name: "kiosk", Role: ca.RoleClient, Enclave: 7}, Expires: t0.Add(time.Hour)}
	if err := s.AddToken(late, t0); err != nil {
		t.Fatal(err)
	}
	if _, err := s.UseToken("cc", "k3", t0.Add(2*time.Hour)); !errors.Is(err, ErrTokenExpired) {
		t.Fatalf("an expired token: %v", err)
	}
	if _, ok := s.Device("kiosk"); ok || s.Tokens.Len() != 0 {
		t.Fatalf("an expired token registered its device or stayed: %v", s.Tokens)
	}
}

// TestPendingDeviceNewToken: a join that was never confirmed leaves its
// device pending once its token expires: the name is held, and an admin's
// new token for it replaces the pending record, so the name is never
// lost to a failed join.
func TestPendingDeviceNewToken(t *testing.T) {
	s := org(t)
	tok := JoinToken{Hash: "aa", Device: Device{Name: "web2", Role: ca.RoleServer, Enclave: 3, ServerID: sid(302)}, Expires: t0.Add(time.Hour)}
	if err := s.AddToken(tok, t0); err != nil {
		t.Fatal(err)
	}
	if _, err := s.UseToken("aa", "k1", t0.Add(time.Minute)); err != nil {
		t.Fatal(err)
	}
	s.pruneTokens(t0.Add(2 * time.Hour))
	if d, ok := s.Device("web2"); !ok || !d.Pending {
		t.Fatalf("after the token expired: %+v", d)
	}
	other := JoinToken{Hash: "bb", Device: Device{Name: "web3", Role: ca.RoleServer, Enclave: 3, ServerID: sid(302)}, Expires: t0.Add(3 * time.Hour)}
	if err := s.AddToken(other, t0.Add(2*time.Hour)); !errors.Is(err, ErrExists) {
		t.Fatalf("the pending device's server id given to another: %v", err)
	}
	again := JoinToken{Hash: "cc", Device: Device{Name: "web2", Role: ca.RoleServer, Enclave: 3, ServerID: sid(302)}, Expires: t0.Add(3 * time.Hour)}
	if err := s.AddToken(again, t0.Add(2*time.Hour)); err != nil {
		t.Fatalf("a new token for the pending device: %v", err)
	}
	if _, ok := s.Device("web2"); ok {
		t.Fatal("the pending record stays beside the new token")
	}
	if _, err := s.UseToken("cc", "k9", t0.Add(2*time.Hour)); err != nil {
		t.Fatalf("the new token with a new key: %v", err)
	}
	if d, ok := s.Device("web2"); !ok || !d.Pending {
		t.Fatalf("after the new join: %+v", d)
	}
	// A pending device an admin revoked (and removed) stays revoked: no
	// new token brings its name back.
	if _, err := s.RevokeDevice("web2", t0.Add(2*time.Hour)); err != nil {
		t.Fatal(err)
	}
	if _, err := s.RemoveDevice("web2"); err != nil {
		t.Fatal(err)
	}
	if err := s.AddToken(JoinToken{Hash: "ee", Device: again.Device, Expires: t0.Add(3 * time.Hour)}, t0.Add(2*time.Hour)); !errors.Is(err, ErrExists) {
		t.Fatalf("a token for a revoked, removed pending device: %v", err)
	}
	if d, _ := s.Device("web2"); !d.Revoked || !d.Removed || d.Pending {
		t.Fatalf("the revoked device's record: %+v", d)
	}
	// An active device gets no token.
	s = org(t)
	if err := s.AddToken(JoinToken{Hash: "cc", Device: again.Device, Expires: t0.Add(3 * time.Hour)}, t0); err != nil {
		t.Fatal(err)
	}
	if _, err := s.UseToken("cc", "k9", t0); err != nil {
		t.Fatal(err)
	}
	if _, err := s.ConfirmJoin("web2", "k8"); !errors.Is(err, ErrMismatch) {
		t.Fatalf("a confirmation with another key than the join's: %v", err)
	}
	s.ConfirmJoin("web2", "k9")
	if err := s.AddToken(JoinToken{Hash: "dd", Device: again.Device, Expires: t0.Add(3 * time.Hour)}, t0.Add(2*time.Hour)); !errors.Is(err, ErrExists) {
		t.Fatalf("a token for an enrolled device: %v", err)
	}
}

// TestAwaitJoin: a device registered awaiting its host (an org file's)
// holds a grant before the join; its token binds it to the host's key
// without registering it twice; a new token of the same identity keeps it
// and its grant, one of another identity is refused while it has one.
func TestAwaitJoin(t *testing.T) {
	s := org(t) // 3-7 allowed
	gw := Device{Name: "gwx", Role: ca.RoleGateway, Enclave: 3}
	if err := s.AwaitJoin(JoinToken{Hash: "aa", Device: gw, Expires: t0.Add(time.Hour)}, t0); err != nil {
		t.Fatal(err)
	}
	if d, ok := s.Device("gwx"); !ok || !d.Awaiting() {
		t.Fatal("gwx does not await its host")
	}
	if err := s.AddGrant("gwx", []Pair{NewPair(3, 7)}, false); err != nil {
		t.Fatalf("a grant to an awaiting gateway: %v", err)
	}
	if err := s.AddToken(JoinToken{Hash: "bb", Device: gw, Expires: t0.Add(time.Hour)}, t0); err != nil {
		t.Fatalf("a new token of the same identity: %v", err)
	}
	if _, err := s.UseToken("aa", "k1", t0); !errors.Is(err, ErrTokenUnknown) {
		t.Fatalf("the replaced token: %v", err)
	}
	other := JoinToken{Hash: "cc", Device: Device{Name: "gwx", Role: ca.RoleMonitor}, Expires: t0.Add(time.Hour)}
	if err := s.AddToken(other, t0); !errors.Is(err, ErrInvalid) {
		t.Fatalf("a token of another identity for a granted device: %v", err)
	}
	// No host joined yet: no certificate of the name confirms it (an
	// old one, from a join whose token was replaced, would take it over).
	if ok, err := s.ConfirmJoin("gwx", "old-key"); ok || !errors.Is(err, ErrMismatch) {
		t.Fatalf("an awaiting device confirmed without a join: %v %v", ok, err)
	}
	if _, err := s.UseToken("bb", "k1", t0); err != nil {
		t.Fatal(err)
	}
	if d, _ := s.Device("gwx"); !d.Pending || d.JoinKey != "k1" {
		t.Fatalf("after the join: %+v", d)
	}
	if d, _ := s.Device("gwx"); d.Awaiting() {
		t.Fatal("gwx still awaits after its host joined")
	}
	if _, err := s.UseToken("bb", "k2", t0); !errors.Is(err, ErrTokenBound) {
		t.Fatalf("the token with another key: %v", err)
	}
	if ok, err := s.ConfirmJoin("gwx", "k1"); !ok || err != nil {
		t.Fatalf("confirm: %v %v", ok, err)
	}
	if g, ok := s.Grant("gwx"); !ok || len(g.Pairs) != 1 {
		t.Fatalf("the grant after the join: %+v", g)
	}
}
