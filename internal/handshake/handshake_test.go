package handshake

import (
	"bytes"
	"errors"
	"net/netip"
	"path/filepath"
	"testing"
	"time"

	"github.com/flynn/noise"

	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/control"
)

var now = time.Now().UTC().Truncate(time.Second)

// org is a CA and credentials for devices of it.
type org struct {
	t    *testing.T
	auth *ca.Authority
}

func newOrg(t *testing.T, name string) *org {
	a, err := ca.Init(filepath.Join(t.TempDir(), "ca"), name, now.Add(-time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	return &org{t, a}
}

func (o *org) creds(id ca.Identity, issued time.Time, days int) *Credentials {
	o.t.Helper()
	is, err := o.auth.Issue(id, nil, days, issued)
	if err != nil {
		o.t.Fatal(err)
	}
	key, err := ca.ParseKeyPEM(is.KeyPEM)
	if err != nil {
		o.t.Fatal(err)
	}
	c, err := NewCredentials(o.auth.Roots(), is.Cert, key)
	if err != nil {
		o.t.Fatal(err)
	}
	return c
}

var (
	idServer = ca.Identity{Name: "web1", Role: ca.RoleServer, Enclave: 3, ServerID: 258, HasServerID: true}
	idClient = ca.Identity{Name: "laptop", Role: ca.RoleClient, Enclave: 7}
)

func grant() *control.Grant {
	return &control.Grant{PSPVersion: 1, Enclave: 3, Peer: 7, Server: 258, Generation: 1, SPIOut: 0x80000011, SPIIn: 0x80000022,
		Lifetime: time.Hour, KeyOut: bytes.Repeat([]byte{1}, 32), KeyIn: bytes.Repeat([]byte{2}, 32)}
}

// handshake runs a whole handshake and returns both sides' results.
func handshake(t *testing.T, client, server *Credentials) (*Result, *Responding, *Session) {
	t.Helper()
	ini, msg, err := Initiate(client, 11, now)
	if err != nil {
		t.Fatal(err)
	}
	in, err := control.ParseInitiation(msg)
	if err != nil {
		t.Fatal(err)
	}
	r, err := Respond(server, &in, now)
	if err != nil {
		t.Fatal(err)
	}
	resp, srvSession, err := r.Finish(22, control.ResponderPayload{Grant: grant()})
	if err != nil {
		t.Fatal(err)
	}
	res, err := ini.Complete(resp, now)
	if err != nil {
		t.Fatal(err)
	}
	return res, r, srvSession
}

func TestHandshake(t *testing.T) {
	o := newOrg(t, "example.org")
	client, server := o.creds(idClient, now, 30), o.creds(idServer, now, 30)
	res, r, srv := handshake(t, client, server)
	if r.Peer.Identity.Name != "laptop" || r.Peer.Identity.Enclave != 7 || !bytes.Equal(r.Peer.Static, client.Static.Public) {
		t.Fatalf("server sees %+v", r.Peer.Identity)
	}
	if res.Peer.Identity.Name != "web1" || res.Peer.Identity.Role != ca.RoleServer || !bytes.Equal(res.Peer.Static, server.Static.Public) {
		t.Fatalf("client sees %+v", res.Peer.Identity)
	}
	g := res.Payload.Grant
	if g == nil || g.SPIOut != 0x80000011 || !bytes.Equal(g.KeyIn, grant().KeyIn) {
		t.Fatalf("grant %+v", res.Payload)
	}
	// Sealed messages both ways; a replay and a changed byte are refused.
	for _, pair := range [][2]*Session{{srv, res.Session}, {res.Session, srv}} {
		msg, err := pair[0].Seal(&control.Inner{Type: control.InnerRekeyNotice, Rekey: &control.RekeyNotice{Reason: 1, Deadline: time.Minute}})
		if err != nil {
			t.Fatal(err)
		}
		s, _ := control.ParseSealed(msg)
		in, err := pair[1].Open(&s)
		if err != nil || in.Rekey == nil || in.Rekey.Deadline != time.Minute {
			t.Fatalf("open: %+v %v", in, err)
		}
		if _, err := pair[1].Open(&s); !errors.Is(err, ErrSessionReplay) {
			t.Fatalf("replay: %v", err)
		}
		msg2, _ := pair[0].Seal(&control.Inner{Type: control.InnerClose, Close: 1})
		msg2[len(msg2)-1] ^= 1
		s2, _ := control.ParseSealed(msg2)
		if _, err := pair[1].Open(&s2); !errors.Is(err, ErrSessionAuth) {
			t.Fatalf("tampered: %v", err)
		}
	}
}

// TestRefusedPeers: a certificate that expired, one of another CA, a
// signature that does not bind, a clock too far off, a changed response.
func TestRefusedPeers(t *testing.T) {
	o := newOrg(t, "example.org")
	server := o.creds(idServer, now, 30)
	respond := func(client *Credentials, at time.Time, mod func([]byte)) error {
		_, msg, err := Initiate(client, 11, at)
		if err != nil {
			t.Fatal(err)
		}
		if mod != nil {
			mod(msg)
		}
		in, err := control.ParseInitiation(msg)
		if err != nil {
			return err
		}
		_, err = Respond(server, &in, now)
		return err
	}
	expired := o.creds(idClient, now.Add(-72*time.Hour), 1)
	if err := respond(expired, now, nil); !errors.Is(err, ErrCert) {
		t.Errorf("expired: %v", err)
	}
	foreign := newOrg(t, "example.org").creds(idClient, now, 30)
	if err := respond(foreign, now, nil); !errors.Is(err, ErrCert) {
		t.Errorf("another CA: %v", err)
	}
	client := o.creds(idClient, now, 30)
	if err := respond(client, now, func(m []byte) { m[len(m)-control.MACLen-2]++ }); !errors.Is(err, ErrSignature) {
		t.Errorf("changed signature: %v", err)
	}
	if err := respond(client, now.Add(-10*time.Minute), nil); !errors.Is(err, ErrClock) {
		t.Errorf("old clock: %v", err)
	}
	// Another device's certificate with this device's Noise key does not
	// verify: the signature binds certificate and static key.
	other := o.creds(ca.Identity{Name: "other", Role: ca.RoleClient, Enclave: 7}, now, 30)
	other.Static = client.Static
	otherCert := other.CertDER
	other.CertDER = client.CertDER
	if err := respond(other, now, nil); !errors.Is(err, ErrSignature) {
		t.Errorf("borrowed certificate: %v", err)
	}
	other.CertDER = otherCert

	// The initiator checks the response.
	ini, msg, _ := Initiate(client, 11, now)
	in, _ := control.ParseInitiation(msg)
	r, err := Respond(server, &in, now)
	if err != nil {
		t.Fatal(err)
	}
	resp, _, _ := r.Finish(22, control.ResponderPayload{Grant: grant()})
	bad := bytes.Clone(resp)
	bad[len(bad)-3] ^= 1
	if _, err := ini.Complete(bad, now); !errors.Is(err, ErrNoise) {
		t.Errorf("changed response: %v", err)
	}
	ini2, _, _ := Initiate(client, 12, now)
	if _, err := ini2.Complete(resp, now); !errors.Is(err, ErrIndex) {
		t.Errorf("response to another initiation: %v", err)
	}
	// A response to another initiation of the same index does not pass
	// Noise either.
	ini3, _, _ := Initiate(client, 11, now)
	if _, err := ini3.Complete(resp, now); err == nil {
		t.Error("a response to another handshake was accepted")
	}
}

// TestCookies: under load, an initiation without a valid mac2 gets a
// cookie; with the cookie for its own address it proceeds; per-source
// floods are dropped.
func TestCookies(t *testing.T) {
	o := newOrg(t, "example.org")
	client := o.creds(idClient, now, 30)
	g := NewGuard(GuardConfig{PerSource: 1000, Burst: 1000, LoadThreshold: 5}, now)
	ini, msg, _ := Initiate(client, 11, now)
	in, _ := control.ParseInitiation(msg)
	src := netip.MustParseAddrPort("192.0.2.1:5000")
	for i := 0; i < 10; i++ {
		g.Admit(netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 0, 0, byte(i)}), 1), &in, now)
	}
	if !g.UnderLoad(now) {
		t.Fatal("not under load after a burst")
	}
	if d := g.Admit(src, &in, now); d != SendCookie {
		t.Fatalf("no cookie under load: %v", d)
	}
	cookie := g.Cookies.Make(src, now)
	with := ini.WithCookie(cookie)
	in2, _ := control.ParseInitiation(with)
	if d := g.Admit(src, &in2, now); d != Proceed {
		t.Fatalf("with its cookie: %v", d)
	}
	if d := g.Admit(netip.MustParseAddrPort("192.0.2.2:5000"), &in2, now); d != SendCookie {
		t.Fatalf("someone else's cookie: %v", d)
	}
	// A cookie outlives one rotation, not two.
	if d := g.Admit(src, &in2, now.Add(CookieLifetime)); d != Proceed {
		t.Fatalf("cookie after one rotation: %v", d)
	}
	if d := g.Admit(src, &in2, now.Add(2*CookieLifetime)); d == Proceed && g.UnderLoad(now.Add(2*CookieLifetime)) {
		t.Fatal("cookie after two rotations")
	}
	// Per address: the burst, then cookies (whoever is behind the
	// address may prove its port), then, past the cookie replies' budget,
	// drops.
	g2 := NewGuard(GuardConfig{PerSource: 1, Burst: 3}, now)
	count := map[Decision]int{}
	for i := 0; i < 200; i++ {
		count[g2.Admit(src, &in, now)]++
	}
	if count[Proceed] != 3 || count[SendCookie] != 3*sharedFactor || count[Drop] != 200-3-3*sharedFactor {
		t.Fatalf("200 initiations with a burst of 3: %v", count)
	}
}

// TestGuardSharedAddress: an abuser behind a shared address (a relay, a
// NAT) spends the address's budget and its own port's, and the real
// client behind the same address still gets through with a cookie (before,
// 40 junk initiations a second locked it out for 10 s).
func TestGuardSharedAddress(t *testing.T) {
	o := newOrg(t, "example.org")
	client := o.creds(idClient, now, 30)
	g := NewGuard(GuardConfig{}, now)
	ini, msg, _ := Initiate(client, 11, now)
	plain, _ := control.ParseInitiation(msg)
	abuser, real := netip.MustParseAddrPort("192.0.2.1:40000"), netip.MustParseAddrPort("192.0.2.1:40001")
	withCookie := func(src netip.AddrPort) *control.Initiation {
		in, _ := control.ParseInitiation(ini.WithCookie(g.Cookies.Make(src, now)))
		return &in
	}
	for i := 0; i < 40; i++ {
		g.Admit(abuser, &plain, now)
		g.Admit(abuser, withCookie(abuser), now)
	}
	if d := g.Admit(abuser, withCookie(abuser), now); d != Drop {
		t.Fatalf("the abuser's own port after 40 a second: %v", d)
	}
	if d := g.Admit(real, &plain, now); d != SendCookie {
		t.Fatalf("the real client without a cookie: %v, want a cookie", d)
	}
	if d := g.Admit(real, withCookie(real), now); d != Proceed {
		t.Fatalf("the real client with its cookie: %v", d)
	}
}

// TestInteroperatesWithStockNoise: a handshake between this package's DH
// and flynn/noise's own 25519 gives the same keys: the optimisation changes
// no byte.
func TestInteroperatesWithStockNoise(t *testing.T) {
	stock := noise.NewCipherSuite(noise.DH25519, noise.CipherAESGCM, noise.HashSHA256)
	for _, pair := range [][2]noise.CipherSuite{{suite, stock}, {stock, suite}} {
		ik, _ := pair[0].GenerateKeypair(nil)
		rk, _ := pair[1].GenerateKeypair(nil)
		ini, _ := noise.NewHandshakeState(noise.Config{CipherSuite: pair[0], Pattern: noise.HandshakeIX, Initiator: true, StaticKeypair: ik})
		res, _ := noise.NewHandshakeState(noise.Config{CipherSuite: pair[1], Pattern: noise.HandshakeIX, StaticKeypair: rk})
		m1, _, _, err := ini.WriteMessage(nil, []byte("hi"))
		if err != nil {
			t.Fatal(err)
		}
		if _, _, _, err := res.ReadMessage(nil, m1); err != nil {
			t.Fatal(err)
		}
		m2, rs1, _, err := res.WriteMessage(nil, []byte("ho"))
		if err != nil {
			t.Fatal(err)
		}
		p, is1, _, err := ini.ReadMessage(nil, m2)
		if err != nil || string(p) != "ho" {
			t.Fatalf("%q %v", p, err)
		}
		if is1.UnsafeKey() != rs1.UnsafeKey() {
			t.Fatal("transport keys differ")
		}
	}
}

// TestVerifiedCache: a peer certificate verified once is not parsed and
// chained again, but its validity period still counts, and the signature
// binding it to each handshake is still checked.
func TestVerifiedCache(t *testing.T) {
	o := newOrg(t, "example.org")
	client, server := o.creds(idClient, now, 30), o.creds(idServer, now, 30)
	handshake(t, client, server) // fills both caches
	if _, ok := server.verified.get(client.CertDER); !ok {
		t.Fatal("the client's certificate was not remembered")
	}
	_, msg, _ := Initiate(client, 11, now.Add(40*24*time.Hour))
	in, _ := control.ParseInitiation(msg)
	if _, err := Respond(server, &in, now.Add(40*24*time.Hour)); !errors.Is(err, ErrCert) {
		t.Fatalf("a remembered certificate past its end: %v", err)
	}
	_, msg, _ = Initiate(client, 12, now)
	msg[len(msg)-control.MACLen-2]++
	in, _ = control.ParseInitiation(msg)
	if _, err := Respond(server, &in, now); !errors.Is(err, ErrSignature) {
		t.Fatalf("a remembered certificate with a bad signature: %v", err)
	}
}

// TestForgedResponseDoesNotEndHandshake: Responses that are not the
// responder's (garbage, a Noise message cut short, a Noise message that
// reads but comes with an expired certificate) fail, and the real
// Response after them still completes the handshake.
func TestForgedResponseDoesNotEndHandshake(t *testing.T) {
	o := newOrg(t, "example.org")
	client, server := o.creds(idClient, now.Add(-time.Hour), 1), o.creds(idServer, now.Add(-time.Hour), 1)
	expired := o.creds(idServer, now.Add(-72*time.Hour), 1)
	ini, msg, err := Initiate(client, 11, now)
	if err != nil {
		t.Fatal(err)
	}
	in, err := control.ParseInitiation(msg)
	if err != nil {
		t.Fatal(err)
	}
	answer := func(c *Credentials) []byte {
		r, err := Respond(c, &in, now)
		if err != nil {
			t.Fatal(err)
		}
		resp, _, err := r.Finish(22, control.ResponderPayload{Grant: grant()})
		if err != nil {
			t.Fatal(err)
		}
		return resp
	}
	real := answer(server)
	forged := answer(expired)
	resp, _ := control.ParseResponse(real)
	short := append([]byte(nil), real[:control.HeaderLen+4]...)
	garbled := append([]byte(nil), real...)
	garbled[control.HeaderLen+4+40] ^= 1 // inside the Noise message
	for name, bad := range map[string][]byte{"expired certificate": forged, "short": short, "garbled": garbled} {
		if _, err := ini.Complete(bad, now); err == nil {
			t.Fatalf("%s: a forged Response completed the handshake", name)
		}
	}
	res, err := ini.Complete(real, now)
	if err != nil {
		t.Fatalf("the real Response after forged ones: %v", err)
	}
	if res.Peer.Identity.Name != "web1" || res.Payload.Grant == nil || resp.Receiver != 11 {
		t.Fatalf("result %+v", res)
	}
}

// TestReplaces: new credentials replace a device's only with a valid
// certificate of the same identity under their own roots.
func TestReplaces(t *testing.T) {
	o := newOrg(t, "example.org")
	id := idServer
	id.Org = "example.org"
	renewed := o.creds(idServer, now, 30)
	if err := renewed.Replaces(id, now); err != nil {
		t.Fatalf("a renewed certificate: %v", err)
	}
	if err := o.creds(idClient, now, 30).Replaces(id, now); !errors.Is(err, ErrCert) {
		t.Fatalf("another device's certificate: %v", err)
	}
	if err := o.creds(idServer, now.Add(-72*time.Hour), 1).Replaces(id, now); !errors.Is(err, ErrCert) {
		t.Fatalf("an expired certificate: %v", err)
	}
	foreign := newOrg(t, "example.org").creds(idServer, now, 30)
	foreign.Roots = o.auth.Roots()
	if err := foreign.Replaces(id, now); !errors.Is(err, ErrCert) {
		t.Fatalf("a certificate of a CA not in the roots: %v", err)
	}
}

// TestIssuedByIssuer: a device whose certificate an issuing CA signed
// (it presents its chain) and one the root signed complete a handshake
// either way round, each knowing the other's identity; without its
// issuer's certificate the first is refused.
func TestIssuedByIssuer(t *testing.T) {
	o := newOrg(t, "example.org")
	is, err := o.auth.IssueIssuer("ks1", 30, now)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	if err := is.WriteFiles(dir, "issuer"); err != nil {
		t.Fatal(err)
	}
	issuer, err := ca.LoadIssuer(filepath.Join(dir, "issuer.crt"), filepath.Join(dir, "issuer.key"))
	if err != nil {
		t.Fatal(err)
	}
	dev, err := issuer.Issue(idServer, nil, 30, now)
	if err != nil {
		t.Fatal(err)
	}
	key, _ := ca.ParseKeyPEM(dev.KeyPEM)
	server, err := NewCredentials(o.auth.Roots(), dev.Cert, key, dev.Chain...)
	if err != nil {
		t.Fatal(err)
	}
	client := o.creds(idClient, now, 30)
	res, r, _ := handshake(t, client, server)
	if res.Peer.Identity.Name != "web1" || r.Peer.Identity.Name != "laptop" {
		t.Fatalf("peers %v %v", res.Peer.Identity, r.Peer.Identity)
	}
	res, r, _ = handshake(t, server, client) // the other way round
	if res.Peer.Identity.Name != "laptop" || r.Peer.Identity.Name != "web1" {
		t.Fatalf("peers %v %v", res.Peer.Identity, r.Peer.Identity)
	}
	bare, _ := NewCredentials(o.auth.Roots(), dev.Cert, key) // its chain left out
	_, msg, _ := Initiate(bare, 1, now)
	in, _ := control.ParseInitiation(msg)
	if _, err := Respond(client, &in, now); !errors.Is(err, ErrCert) {
		t.Fatalf("a certificate without its issuer: %v", err)
	}
}
