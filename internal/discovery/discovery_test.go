package discovery

import (
	"crypto/ed25519"
	"net/netip"
	"path/filepath"
	"testing"
	"time"

	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/control"
	"github.com/enclavekeys/enclave/internal/keys"
)

var now = time.Now().UTC().Truncate(time.Second)

// signer is an intermediary (or any device) that appends entries.
type signer struct {
	der []byte
	key ed25519.PrivateKey
}

type fixture struct {
	t    testing.TB
	auth *ca.Authority
	// apart are the entries the last path sent apart (step.detach).
	apart []control.Entry
}

func newFixture(t testing.TB) *fixture {
	a, err := ca.Init(filepath.Join(t.TempDir(), "ca"), "example.org", now.Add(-time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	return &fixture{t: t, auth: a}
}

func (f *fixture) signer(id ca.Identity, issued time.Time, days int) signer {
	f.t.Helper()
	is, err := f.auth.Issue(id, nil, days, issued)
	if err != nil {
		f.t.Fatal(err)
	}
	k, err := ca.ParseKeyPEM(is.KeyPEM)
	if err != nil {
		f.t.Fatal(err)
	}
	return signer{is.Cert.Raw, k}
}

func gw(name string, e keys.EnclaveID) ca.Identity {
	return ca.Identity{Name: name, Role: ca.RoleGateway, Enclave: e}
}

var noise = []byte("noise message 1 of this handshake")

// here is the server's control address: where honest gateways send the
// handshakes of these tests.
var here = netip.MustParseAddrPort("192.0.2.3:1001")

func addressedHere(a netip.AddrPort) bool { return a == here }

// newDecider is New with the server at here.
func newDecider(cfg Config) *Decider {
	if cfg.Addressed == nil {
		cfg.Addressed = addressedHere
	}
	return New(cfg)
}

// path builds an initiation's path record: each step is an entry, signed
// by s when s.key is set.
type step struct {
	s       signer
	enclave uint16
	self    bool
	forge   bool           // sign something else
	to      netip.AddrPort // where the gateway sent it (zero: here)
	v1      bool           // write a version 1 entry (no destination)
	flags   uint8
	pairs   []control.Pair
	detach  bool // send the entry apart, a stub in the record
}

func (f *fixture) path(steps ...step) *control.PathRecord {
	f.t.Helper()
	msg, _, _ := control.AppendInitiation(nil, 1, noise)
	at, _ := control.PathOffset(msg)
	f.apart = nil
	for _, st := range steps {
		in, err := control.ParseInitiation(msg)
		if err != nil {
			f.t.Fatal(err)
		}
		e := control.PathEntry{Enclave: st.enclave, Flags: st.flags, Pairs: st.pairs, To: st.to}
		if !e.To.IsValid() && !st.self {
			e.To = here
		}
		if st.self {
			e.Flags |= control.PathSelfReport
		}
		if st.s.key != nil {
			e.Flags |= control.PathSigned
			e.Cert = st.s.der
			if err := SignEntry(st.s.key, in.Noise, &in.Path, &e); err != nil {
				f.t.Fatal(err)
			}
			if st.forge {
				m, _ := control.PathSignedBytes(in.Noise, in.Path.PriorBytes(len(in.Path.Entries)), &e)
				copy(e.Signature[:], ed25519.Sign(st.s.key, append(m, 1)))
			}
		}
		if st.detach {
			raw, err := control.EntryBytes(nil, &e)
			if err != nil {
				f.t.Fatal(err)
			}
			m, err := control.AppendEntryMessage(nil, 1, raw)
			if err != nil {
				f.t.Fatal(err)
			}
			x, err := control.ParseEntryMessage(m)
			if err != nil {
				f.t.Fatal(err)
			}
			f.apart = append(f.apart, x)
			if msg, err = control.AppendStub(msg, at, raw); err != nil {
				f.t.Fatal(err)
			}
			continue
		}
		if msg, err = control.AppendEntry(msg, at, &e); err != nil {
			f.t.Fatal(err)
		}
		if st.v1 {
			msg = toVersion1(f.t, msg, at)
		}
	}
	in, err := control.ParseInitiation(msg)
	if err != nil {
		f.t.Fatal(err)
	}
	return &in.Path
}

// toVersion1 rewrites the last entry of the path record at msg[at:] as
// an old gateway wrote it: version 1, no destination, the same signature.
func toVersion1(t testing.TB, msg []byte, at int) []byte {
	t.Helper()
	rec, err := control.ParsePathRecord(msg[at:])
	if err != nil {
		t.Fatal(err)
	}
	last := rec.Entries[len(rec.Entries)-1]
	raw := last.Raw
	np := int(raw[6]) // [2] length, version, flags, [2] enclave, pair count
	addrAt := 7 + 4*np
	body := append([]byte{1}, raw[3:addrAt]...)
	body = append(body, raw[addrAt+18:]...)
	out := append([]byte(nil), msg[:len(msg)-len(raw)]...)
	out = append(out, byte(len(body)>>8), byte(len(body)))
	return append(out, body...)
}

func kinds(d Decision) map[Kind]int {
	m := map[Kind]int{}
	for _, x := range d.Disagreements {
		m[x.Kind]++
	}
	return m
}

func TestOrderOfTrust(t *testing.T) {
	f := newFixture(t)
	g7, g3 := f.signer(gw("gw7", 7), now, 30), f.signer(gw("gw3", 3), now, 30)
	g7b := f.signer(gw("gw7b", 7), now, 30)
	revoked := f.signer(gw("gwr", 7), now, 30)
	client := f.signer(ca.Identity{Name: "c", Role: ca.RoleClient}, now, 30)
	expired := f.signer(gw("gwold", 7), now.Add(-72*time.Hour), 1)
	laptop := ca.Identity{Org: "example.org", Name: "laptop", Role: ca.RoleClient}
	pinned := ca.Identity{Org: "example.org", Name: "pinned", Role: ca.RoleClient, Enclave: 9}
	cases := []struct {
		name    string
		cfg     Config
		client  ca.Identity
		path    *control.PathRecord
		want    keys.EnclaveID
		source  Source
		kinds   map[Kind]int
		wantErr bool
	}{
		{"certificate wins", Config{}, pinned, f.path(), 9, FromCertificate, map[Kind]int{}, false},
		{"certificate over a chain", Config{}, pinned, f.path(step{s: g7, enclave: 7}, step{s: g3, enclave: 3}), 9, FromCertificate, map[Kind]int{ChainVsCertificate: 1}, false},
		{"chain of two gateways", Config{}, laptop, f.path(step{s: g7, enclave: 7}, step{s: g3, enclave: 3}), 7, FromChain, map[Kind]int{}, false},
		{"client end is the first valid entry", Config{}, laptop, f.path(step{s: g7b, enclave: 7}, step{s: g7, enclave: 7}, step{s: g3, enclave: 3}), 7, FromChain, map[Kind]int{}, false},
		{"server end elsewhere", Config{}, laptop, f.path(step{s: g7, enclave: 7}), 7, FromChain, map[Kind]int{ServerEnd: 1}, false},
		{"forged entry skipped", Config{}, laptop, f.path(step{s: g7, enclave: 7, forge: true}, step{s: g3, enclave: 3}), 3, FromChain, map[Kind]int{BadSignature: 1}, false},
		{"entry lies about its enclave", Config{}, laptop, f.path(step{s: g7, enclave: 5}, step{s: g3, enclave: 3}), 3, FromChain, map[Kind]int{EnclaveMismatch: 1}, false},
		{"revoked gateway", Config{Revoked: func(n string) bool { return n == "gwr" }}, laptop, f.path(step{s: revoked, enclave: 7}, step{s: g3, enclave: 3}), 3, FromChain, map[Kind]int{Revoked: 1}, false},
		{"client signs for itself", Config{}, laptop, f.path(step{s: client, enclave: 7}, step{s: g3, enclave: 3}), 3, FromChain, map[Kind]int{NotGateway: 1}, false},
		{"expired gateway", Config{}, laptop, f.path(step{s: expired, enclave: 7}, step{s: g3, enclave: 3}), 3, FromChain, map[Kind]int{BadCertificate: 1}, false},
		{"self-report not trusted", Config{}, laptop, f.path(step{enclave: 7, self: true}), 0, 0, map[Kind]int{UnsignedIgnored: 1}, true},
		{"self-report trusted", Config{TrustUnsigned: true}, laptop, f.path(step{enclave: 7, self: true}), 7, FromUnsigned, map[Kind]int{}, false},
		{"chain over self-report", Config{TrustUnsigned: true}, laptop, f.path(step{enclave: 5, self: true}, step{s: g7, enclave: 7}, step{s: g3, enclave: 3}), 7, FromChain, map[Kind]int{}, false},
		{"nothing at all", Config{TrustUnsigned: true}, laptop, f.path(), 0, 0, map[Kind]int{}, true},
		// Item 11 of issue 20: a tag made for a handshake sent elsewhere
		// (an attacker's own address) and replayed here places no one;
		// the honest gateways on the way here still do.
		{"replayed tag", Config{}, laptop, f.path(step{s: g7, enclave: 7, to: netip.MustParseAddrPort("198.51.100.9:4000")}), 0, 0, map[Kind]int{Misdirected: 1}, true},
		{"replayed tag, then the real path", Config{}, laptop, f.path(step{s: g7, enclave: 7, to: netip.MustParseAddrPort("198.51.100.9:4000")}, step{s: g3, enclave: 3}), 3, FromChain, map[Kind]int{Misdirected: 1}, false},
		{"another port of this host", Config{}, laptop, f.path(step{s: g7, enclave: 7, to: netip.AddrPortFrom(here.Addr(), 1003)}), 0, 0, map[Kind]int{Misdirected: 1}, true},
		{"old gateway's entry", Config{}, laptop, f.path(step{s: g7, enclave: 7, v1: true}, step{s: g3, enclave: 3}), 3, FromChain, map[Kind]int{Unbound: 1}, false},
		{"no addresses known", Config{Addressed: func(netip.AddrPort) bool { return false }}, laptop, f.path(step{s: g7, enclave: 7}), 0, 0, map[Kind]int{Misdirected: 1}, true},
	}
	for _, c := range cases {
		c.cfg.Roots, c.cfg.Own = f.auth.Roots(), 3
		dec, err := newDecider(c.cfg).Decide(c.client, noise, c.path, now)
		if (err != nil) != c.wantErr || dec.Enclave != c.want || dec.Source != c.source {
			t.Errorf("%s: enclave %d from %v (%v), want %d from %v", c.name, dec.Enclave, dec.Source, err, c.want, c.source)
		}
		got := kinds(dec)
		if len(got) != len(c.kinds) {
			t.Errorf("%s: disagreements %v, want %v", c.name, dec.Disagreements, c.kinds)
			continue
		}
		for k, n := range c.kinds {
			if got[k] != n {
				t.Errorf("%s: %d × %s, want %d (%v)", c.name, got[k], k, n, dec.Disagreements)
			}
		}
	}
}

// TestEntriesBoundToTheHandshake: a chain copied from one handshake onto
// another does not verify.
func TestEntriesBoundToTheHandshake(t *testing.T) {
	f := newFixture(t)
	g7 := f.signer(gw("gw7", 7), now, 30)
	rec := f.path(step{s: g7, enclave: 7})
	d := newDecider(Config{Roots: f.auth.Roots(), Own: 7})
	laptop := ca.Identity{Org: "example.org", Name: "laptop", Role: ca.RoleClient}
	if _, err := d.Decide(laptop, []byte("another handshake"), rec, now); err == nil {
		t.Fatal("a chain from another handshake decided the enclave")
	}
	if d.Counts()[BadSignature] != 1 {
		t.Fatalf("counts %v", d.Counts())
	}
}

// TestMajorityWindow: one odd path (a route change, or a lie) does not
// move an initiator whose recent paths agree; a lasting change does.
func TestMajorityWindow(t *testing.T) {
	f := newFixture(t)
	g7, g8 := f.signer(gw("gw7", 7), now, 30), f.signer(gw("gw8", 8), now, 30)
	d := newDecider(Config{Roots: f.auth.Roots(), Own: 7, Window: 5})
	laptop := ca.Identity{Org: "example.org", Name: "laptop", Role: ca.RoleClient}
	via7, via8 := f.path(step{s: g7, enclave: 7}), f.path(step{s: g8, enclave: 8})
	for i := 0; i < 3; i++ {
		if dec, _ := d.Decide(laptop, noise, via7, now); dec.Enclave != 7 {
			t.Fatalf("round %d: %d", i, dec.Enclave)
		}
	}
	dec, _ := d.Decide(laptop, noise, via8, now)
	if dec.Enclave != 7 || kinds(dec)[Conflict] != 1 {
		t.Fatalf("one odd path: %+v", dec)
	}
	for i := 0; i < 3; i++ {
		dec, _ = d.Decide(laptop, noise, via8, now)
	}
	if dec.Enclave != 8 {
		t.Fatalf("after a lasting change: %d", dec.Enclave)
	}
	// Another initiator has its own window.
	other := ca.Identity{Org: "example.org", Name: "other", Role: ca.RoleClient}
	if dec, _ := d.Decide(other, noise, via7, now); dec.Enclave != 7 {
		t.Fatalf("other initiator: %d", dec.Enclave)
	}
}

// FuzzDecide: any path record that parses is decided or refused without a
// panic, and nothing unsigned decides unless allowed.
func FuzzDecide(f *testing.F) {
	fx := newFixture(f)
	a := fx.auth
	g7 := fx.signer(gw("gw7", 7), now, 30)
	msg, _, _ := control.AppendInitiation(nil, 1, noise)
	at, _ := control.PathOffset(msg)
	e := control.PathEntry{Flags: control.PathSigned, Enclave: 7, Cert: g7.der, To: here}
	m, _ := control.PathSignedBytes(noise, nil, &e)
	copy(e.Signature[:], ed25519.Sign(g7.key, m))
	msg, _ = control.AppendEntry(msg, at, &e)
	f.Add(msg[at:])
	f.Add([]byte{1, 0, 7, 1, 4, 0, 7, 0, 0, 0})
	f.Add(toVersion1(f, msg, at)[at:])
	d := newDecider(Config{Roots: a.Roots(), Own: 3})
	laptop := ca.Identity{Org: "example.org", Name: "laptop", Role: ca.RoleClient}
	f.Fuzz(func(t *testing.T, b []byte) {
		rec, err := control.ParsePathRecord(b)
		if err != nil {
			return
		}
		dec, err := d.Decide(laptop, noise, &rec, now)
		if err == nil && dec.Source == FromUnsigned {
			t.Fatal("an unsigned entry decided without TrustUnsigned")
		}
	})
}

// TestIntermediaries: the verified entries come back in path order with
// their flags and pairs; forged ones do not; need-key applies only to
// pairs the entry does not hold.
func TestIntermediaries(t *testing.T) {
	f := newFixture(t)
	g7, g3, g3b := f.signer(gw("gw7", 7), now, 30), f.signer(gw("gw3", 3), now, 30), f.signer(gw("gw3b", 3), now, 30)
	path := f.path(
		step{s: g7, enclave: 7, flags: control.PathNeedKey, pairs: []control.Pair{{A: 7, B: 3}}},
		step{s: g3b, enclave: 3, flags: control.PathNeedKey, forge: true},
		step{s: g3, enclave: 3, flags: control.PathNeedKey},
	)
	d := newDecider(Config{Roots: f.auth.Roots(), Own: 3})
	dec, err := d.Decide(ca.Identity{Org: "example.org", Name: "c", Role: ca.RoleClient}, noise, path, now)
	if err != nil || dec.Enclave != 7 {
		t.Fatalf("%+v %v", dec, err)
	}
	if len(dec.Intermediaries) != 2 || dec.Intermediaries[0].Identity.Name != "gw7" || dec.Intermediaries[1].Identity.Name != "gw3" || dec.Intermediaries[1].Entry != 2 {
		t.Fatalf("intermediaries %+v", dec.Intermediaries)
	}
	if dec.Intermediaries[0].NeedsKey(3, 7) || !dec.Intermediaries[0].NeedsKey(3, 9) || !dec.Intermediaries[1].NeedsKey(3, 7) {
		t.Error("need-key does not follow the pairs held")
	}
	plain := Intermediary{Pairs: nil}
	if plain.NeedsKey(3, 7) {
		t.Error("an entry without need-key needs a key")
	}
	if kinds(dec)[BadSignature] != 1 {
		t.Errorf("disagreements %+v", dec.Disagreements)
	}
}

// TestDetachedEntries: an entry that travelled apart counts as if it had
// come in the path record, when it arrived: the client's gateway's entry
// sent apart and the server's gateway's in the record after its stub
// (signing it) both verify, and the chain decides. Missing, expired or
// forged, it does not: counted, and the rest decides.
func TestDetachedEntries(t *testing.T) {
	f := newFixture(t)
	g7, g3 := f.signer(gw("gw7", 7), now, 30), f.signer(gw("gw3", 3), now, 30)
	client := ca.Identity{Org: "example.org", Name: "c", Role: ca.RoleClient}
	decide := func(add bool, at time.Time, steps ...step) Decision {
		t.Helper()
		path := f.path(steps...)
		d := newDecider(Config{Roots: f.auth.Roots(), Own: 3})
		if add {
			for _, e := range f.apart {
				d.AddDetached(e, netip.MustParseAddr("192.0.2.7"), at)
			}
		}
		dec, _ := d.Decide(client, noise, path, now)
		return dec
	}
	both := []step{{s: g7, enclave: 7, detach: true}, {s: g3, enclave: 3}}
	if dec := decide(true, now, both...); dec.Enclave != 7 || dec.Source != FromChain || len(dec.Intermediaries) != 2 || len(dec.Disagreements) != 0 {
		t.Fatalf("with the entry: %+v", dec)
	}
	if dec := decide(true, now, step{s: g7, enclave: 7}, step{s: g3, enclave: 3, detach: true}); dec.Enclave != 7 || len(dec.Intermediaries) != 2 {
		t.Fatalf("the server's gateway's entry apart: %+v", dec)
	}
	// Without the entry, the gateway after its stub verifies (its need-key
	// counts) but places no one: it does not stand at the client's end.
	if dec := decide(false, now, both...); kinds(dec)[DetachedMissing] != 1 || len(dec.Intermediaries) != 1 || dec.Enclave != 0 {
		t.Fatalf("without the entry: %+v", dec)
	}
	// The same entry sent again counts from its last arrival.
	path := f.path(both...)
	d := newDecider(Config{Roots: f.auth.Roots(), Own: 3})
	d.AddDetached(f.apart[0], netip.MustParseAddr("192.0.2.7"), now.Add(-6*time.Second))
	d.AddDetached(f.apart[0], netip.MustParseAddr("192.0.2.7"), now)
	if dec, _ := d.Decide(client, noise, path, now); dec.Enclave != 7 {
		t.Fatalf("an entry sent again: %+v", dec)
	}
	if dec := decide(true, now.Add(-6*time.Second), both...); kinds(dec)[DetachedMissing] != 1 {
		t.Fatalf("with an entry kept too long: %+v", dec)
	}
	if dec := decide(true, now, step{s: g7, enclave: 7, detach: true, forge: true}); kinds(dec)[BadSignature] != 1 || dec.Enclave != 0 {
		t.Fatalf("a forged entry apart: %+v", dec)
	}
	// One source's share of entries kept.
	kept := 0
	dd := newDecider(Config{Roots: f.auth.Roots(), Own: 3})
	for i := range 3000 {
		e := control.Entry{Raw: []byte{byte(i >> 8), byte(i)}}
		e.Hash[0], e.Hash[1] = byte(i>>8), byte(i)
		if dd.AddDetached(e, netip.MustParseAddr("192.0.2.9"), now) {
			kept++
		}
	}
	if kept != int(entryBurst) || !dd.AddDetached(control.Entry{Hash: [32]byte{0xff}}, netip.MustParseAddr("192.0.2.10"), now) {
		t.Errorf("one source had %d entries kept at once, want %v; another source was refused", kept, entryBurst)
	}
	if DetachedMissing.Alarming() {
		t.Error("a missing entry alarms (it is a lost or late datagram)")
	}
}

// TestAlarming: what an operator must act on is alarming (warned), what
// the normal path shows (a client-side gateway's enclave at the server
// end, a changed route, unsigned entries ignored) is only counted.
func TestAlarming(t *testing.T) {
	for k, want := range map[Kind]bool{ServerEnd: false, Conflict: false, UnsignedIgnored: false,
		ChainVsCertificate: true, BadSignature: true, BadCertificate: true, NotGateway: true, Revoked: true, EnclaveMismatch: true} {
		if k.Alarming() != want {
			t.Errorf("%s: alarming %v, want %v", k, !want, want)
		}
	}
}
