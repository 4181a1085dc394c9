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
	if _, err := s.TakeToken("zz", t0); !errors.Is(err, ErrTokenUnknown) {
		t.Fatalf("an unknown token: %v", err)
	}
	got, err := s.TakeToken("aa", t0.Add(time.Minute))
	if err != nil || got.Device.Name != "web2" || got.Overlay != "100.64.3.3/16" {
		t.Fatalf("take: %+v %v", got, err)
	}
	if d, ok := s.Device("web2"); !ok || d.Role != ca.RoleServer || *d.ServerID != 302 {
		t.Fatalf("the device was not registered: %+v", d)
	}
	if _, err := s.TakeToken("aa", t0.Add(time.Minute)); !errors.Is(err, ErrTokenUnknown) {
		t.Fatalf("a token used twice: %v", err)
	}
	late := JoinToken{Hash: "cc", Device: Device{Name: "kiosk", Role: ca.RoleClient, Enclave: 7}, Expires: t0.Add(time.Hour)}
	if err := s.AddToken(late, t0); err != nil {
		t.Fatal(err)
	}
	if _, err := s.TakeToken("cc", t0.Add(2*time.Hour)); !errors.Is(err, ErrTokenExpired) {
		t.Fatalf("an expired token: %v", err)
	}
	if _, ok := s.Device("kiosk"); ok || len(s.Tokens) != 0 {
		t.Fatalf("an expired token registered its device or stayed: %v", s.Tokens)
	}
}
