package registry

import (
	"errors"
	"net/netip"
	"testing"
	"time"

	"github.com/enclavekeys/enclave/internal/ca"
)

// TestOverlayAddresses (issue 32, item 4): an enclave's block hands out
// its lowest free address to a token or agent device given none (never
// the block's network or broadcast address, never one a device or token
// holds), refuses one given by hand that is held, refuses overlapping
// blocks, and says so when the block is used up; a certificate naming
// another address than the registry's is refused.
func TestOverlayAddresses(t *testing.T) {
	s := org(t)
	pfx := netip.MustParsePrefix
	if err := s.SetAddresses(3, pfx("100.64.3.0/30"), pfx("100.64.0.0/16")); err != nil {
		t.Fatal(err)
	}
	if err := s.SetAddresses(7, pfx("100.64.3.0/24"), pfx("100.64.0.0/16")); !errors.Is(err, ErrExists) {
		t.Fatalf("an overlapping block: %v", err)
	}
	if err := s.SetAddresses(7, pfx("10.0.0.0/24"), pfx("100.64.0.0/16")); !errors.Is(err, ErrInvalid) {
		t.Fatalf("a block outside its network: %v", err)
	}
	if err := s.AddDevice(Device{Name: "web2", Role: ca.RoleServer, Enclave: 3, ServerID: sid(302)}); err != nil {
		t.Fatal(err)
	}
	if d, _ := s.Device("web2"); d.Overlay != "100.64.3.1/16" {
		t.Fatalf("the first address handed out: %q", d.Overlay)
	}
	tok := JoinToken{Hash: "aa", Device: Device{Name: "web3", Role: ca.RoleServer, Enclave: 3, ServerID: sid(303)}, Expires: t0.Add(time.Hour)}
	if err := s.AddToken(tok, t0); err != nil {
		t.Fatal(err)
	}
	if s.Tokens.Slice()[0].Overlay != "100.64.3.2/16" {
		t.Fatalf("the token's address: %q", s.Tokens.Slice()[0].Overlay)
	}
	// .3 is the /30's broadcast address: the block is used up.
	if err := s.AddDevice(Device{Name: "web4", Role: ca.RoleServer, Enclave: 3, ServerID: sid(304)}); !errors.Is(err, ErrAddressesOut) {
		t.Fatalf("a full block: %v", err)
	}
	if err := s.AddDevice(Device{Name: "web5", Role: ca.RoleServer, Enclave: 3, ServerID: sid(305), Overlay: "100.64.3.2/16"}); !errors.Is(err, ErrExists) {
		t.Fatalf("a held address given by hand: %v", err)
	}
	if err := s.AddDevice(Device{Name: "web7", Role: ca.RoleServer, Enclave: 3, ServerID: sid(307), Overlay: "::ffff:100.64.3.2/112"}); !errors.Is(err, ErrInvalid) {
		t.Fatalf("a held address given IPv4-mapped: %v", err)
	}
	if err := s.AddDevice(Device{Name: "web6", Role: ca.RoleServer, Enclave: 3, ServerID: sid(306), Overlay: "100.64.9.9/16"}); err != nil {
		t.Fatalf("a free address given by hand: %v", err)
	}
	// The token's join keeps its address.
	if _, err := s.UseToken("aa", "k", t0.Add(time.Minute)); err != nil {
		t.Fatal(err)
	}
	if d, _ := s.Device("web3"); d.Overlay != "100.64.3.2/16" {
		t.Fatalf("the joined device's address: %q", d.Overlay)
	}
	// Gateways get none; an enclave without a block hands out none.
	if err := s.AddDevice(Device{Name: "gw3", Role: ca.RoleGateway, Enclave: 3}); err != nil {
		t.Fatal(err)
	}
	if d, _ := s.Device("gw3"); d.Overlay != "" {
		t.Fatalf("a gateway's address: %q", d.Overlay)
	}
	if err := s.AddDevice(Device{Name: "desk", Role: ca.RoleClient, Enclave: 7}); err != nil {
		t.Fatal(err)
	}
	// The key service refuses a certificate that names another address.
	id := ca.Identity{Org: "x", Name: "web2", Role: ca.RoleServer, Enclave: 3, ServerID: 302, HasServerID: true, Overlay: pfx("100.64.3.9/16")}
	if _, err := s.Authorize(id, ""); !errors.Is(err, ErrMismatch) {
		t.Fatalf("a certificate with another address: %v", err)
	}
	id.Overlay = pfx("100.64.3.1/16")
	if _, err := s.Authorize(id, ""); err != nil {
		t.Fatalf("the registered address: %v", err)
	}
}
