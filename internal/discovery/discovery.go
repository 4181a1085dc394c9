// Package discovery decides which enclave a handshake's initiator is in
// (DESIGN §5.3), from the path record intermediaries append to handshake
// packets: it verifies each entry's signature and certificate, applies the
// order of trust (the initiator's certificate; then the client end of a
// chain signed by a registered intermediary standing in its own enclave;
// then, where the operator allows, unsigned entries and self-reports), keeps
// a window of recent observations per initiator and takes the most
// frequent, and counts every disagreement.
package discovery

import (
	"crypto/ed25519"
	"crypto/x509"
	"errors"
	"fmt"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/control"
	"github.com/enclavekeys/enclave/internal/keys"
)

// ErrUndecided: nothing trusted names the initiator's enclave.
var ErrUndecided = errors.New("discovery: the initiator's enclave could not be decided")

// Source is where a decision came from, most trusted first.
type Source int

// The sources.
const (
	FromCertificate Source = iota + 1
	FromChain
	FromUnsigned
)

func (s Source) String() string {
	switch s {
	case FromCertificate:
		return "certificate"
	case FromChain:
		return "chain"
	case FromUnsigned:
		return "unsigned"
	}
	return "none"
}

// Kind names a disagreement or a rejected entry, as metric labels do.
type Kind string

// The kinds of disagreement counted.
const (
	ChainVsCertificate Kind = "chain_vs_certificate" // a trusted chain names another enclave than the certificate
	ServerEnd          Kind = "server_end"           // the entry nearest the server is not the server's enclave
	BadSignature       Kind = "bad_signature"        // an entry's signature does not verify
	BadCertificate     Kind = "bad_certificate"      // an entry's certificate is not a valid org certificate
	NotGateway         Kind = "not_gateway"          // an entry signed by a device that is no intermediary
	Revoked            Kind = "revoked"              // an entry signed by a revoked intermediary
	EnclaveMismatch    Kind = "enclave_mismatch"     // an intermediary's entry names another enclave than its certificate
	Conflict           Kind = "conflict"             // this observation differs from the window's majority
	UnsignedIgnored    Kind = "unsigned_ignored"     // unsigned entries present but not trusted
	Misdirected        Kind = "misdirected"          // an entry made for a handshake sent to another destination
	Unbound            Kind = "unbound"              // a version 1 entry, which names no destination
	DetachedMissing    Kind = "detached_missing"     // a stub whose entry, sent apart, is not here
)

// Alarming reports whether a kind calls for an operator: a forged, badly
// signed or revoked entry, or a chain against the certificate. The others
// happen on the normal path (a gateway on the client's side of the path
// stands in the client's enclave, not the server's; routes change; unsigned
// entries are ignored by design): they are counted, not logged as warnings.
func (k Kind) Alarming() bool {
	switch k {
	case ServerEnd, Conflict, UnsignedIgnored, DetachedMissing:
		return false
	}
	return true
}

// Disagreement is one thing found wrong or inconsistent in a path record.
type Disagreement struct {
	Kind   Kind
	Entry  int // index in the path record, -1 when about the whole
	Detail string
}

// Config sets up a Decider.
type Config struct {
	// Roots are the org CA (or CAs) every signed entry's certificate must
	// chain to.
	Roots *ca.Roots
	// Own is the server's own enclave (the server end of a chain).
	Own keys.EnclaveID
	// TrustUnsigned lets unsigned entries and self-reports decide when
	// nothing better does.
	TrustUnsigned bool
	// Window is how many recent observations are kept per initiator
	// (default 16), and MaxInitiators how many initiators (default 65536).
	Window, MaxInitiators int
	// Revoked reports whether a device (by name) is revoked; nil: none is.
	Revoked func(name string) bool
	// Addressed reports whether a signed entry's destination (where its
	// gateway sent the handshake) is this server: an entry made for a
	// handshake sent elsewhere and replayed here is not trusted. Nil
	// trusts no signed entry (fail closed).
	Addressed func(netip.AddrPort) bool
}

// Decision is the enclave decided for an initiator.
type Decision struct {
	Enclave keys.EnclaveID
	Source  Source
	// Disagreements found on the way; none of them was trusted over a
	// higher source.
	Disagreements []Disagreement
	// Intermediaries are the signed entries that verified, in path order:
	// the gateways that forwarded the handshake, with what they asked for
	// (need-key) and the pairs they hold keys for.
	Intermediaries []Intermediary
}

// Intermediary is a verified path entry: a registered gateway, standing
// where it says, that signed this handshake.
type Intermediary struct {
	Entry    int
	Identity ca.Identity
	Flags    uint8
	Pairs    []control.Pair
}

// NeedsKey reports whether the intermediary asked for the keys of the SA
// in pair (a, b): it set need-key and does not list the pair as one it
// holds a key for.
func (m *Intermediary) NeedsKey(a, b keys.EnclaveID) bool {
	if m.Flags&control.PathNeedKey == 0 {
		return false
	}
	for _, p := range m.Pairs {
		if (keys.EnclaveID(p.A) == a && keys.EnclaveID(p.B) == b) || (keys.EnclaveID(p.A) == b && keys.EnclaveID(p.B) == a) {
			return false
		}
	}
	return true
}

// SignEntry signs e as the next entry of rec, the path record of the
// handshake whose Noise message is noise, with the intermediary's
// certificate key: the signature covers the handshake, every entry before
// it and e itself. e must carry the certificate and the PathSigned flag.
func SignEntry(key ed25519.PrivateKey, noise []byte, rec *control.PathRecord, e *control.PathEntry) error {
	m, err := control.PathSignedBytes(noise, rec.PriorBytes(len(rec.Entries)), e)
	if err != nil {
		return err
	}
	copy(e.Signature[:], ed25519.Sign(key, m))
	return nil
}

// Decider decides initiators' enclaves. Safe for concurrent use.
type Decider struct {
	cfg     Config
	roots   atomic.Pointer[ca.Roots] // cfg.Roots, or what SetRoots put
	mu      sync.Mutex
	windows map[string]*window
	counts  map[Kind]uint64
	// detached are entries that travelled apart (detached.go).
	detached detachedStore
}

// New returns a Decider.
func New(cfg Config) *Decider {
	if cfg.Window <= 0 {
		cfg.Window = 16
	}
	if cfg.MaxInitiators <= 0 {
		cfg.MaxInitiators = 65536
	}
	d := &Decider{cfg: cfg, windows: map[string]*window{}, counts: map[Kind]uint64{}}
	d.roots.Store(cfg.Roots)
	return d
}

// SetRoots replaces the CAs entries are verified against (a device's
// reload during a CA rollover).
func (d *Decider) SetRoots(r *ca.Roots) { d.roots.Store(r) }

// Counts returns how many of each disagreement were seen.
func (d *Decider) Counts() map[Kind]uint64 {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := make(map[Kind]uint64, len(d.counts))
	for k, v := range d.counts {
		out[k] = v
	}
	return out
}

// Decide decides the enclave of the initiator with certificate identity
// client, whose handshake's Noise message is noise and whose packet carried
// the path record rec, at now.
func (d *Decider) Decide(client ca.Identity, noise []byte, rec *control.PathRecord, now time.Time) (Decision, error) {
	var dec Decision
	dec.Disagreements = d.resolve(rec, now)
	chain, chainAt := keys.EnclaveID(0), -1
	// A stub whose entry did not come hides who stood before the rest: no
	// entry after it may place the client (the nearest gateway's would
	// name the wrong end of the path).
	hidden := false
	var unsigned keys.EnclaveID
	for i := range rec.Entries {
		e := &rec.Entries[i]
		if e.Version == control.PathVersionStub {
			hidden = true
			continue
		}
		if !e.Signed() {
			if unsigned == 0 && e.Enclave != 0 {
				unsigned = keys.EnclaveID(e.Enclave)
			}
			continue
		}
		id, kind, detail := d.verify(noise, rec, i, now)
		if kind != "" {
			dec.Disagreements = append(dec.Disagreements, Disagreement{kind, i, detail})
			continue
		}
		dec.Intermediaries = append(dec.Intermediaries, Intermediary{Entry: i, Identity: id, Flags: e.Flags, Pairs: e.Pairs})
		if chainAt < 0 && !hidden {
			chain, chainAt = keys.EnclaveID(e.Enclave), i
		}
	}
	// The entry nearest the server should stand in the server's enclave.
	if n := len(rec.Entries); chainAt >= 0 && n > 0 {
		if last := rec.Entries[n-1]; last.Signed() && keys.EnclaveID(last.Enclave) != d.cfg.Own {
			dec.Disagreements = append(dec.Disagreements, Disagreement{ServerEnd, n - 1, fmt.Sprintf("entry names enclave %d, the server is in %d", last.Enclave, d.cfg.Own)})
		}
	}
	switch {
	case client.Enclave != 0:
		dec.Enclave, dec.Source = client.Enclave, FromCertificate
		if chainAt >= 0 && chain != client.Enclave {
			dec.Disagreements = append(dec.Disagreements, Disagreement{ChainVsCertificate, chainAt, fmt.Sprintf("chain says %d, certificate says %d", chain, client.Enclave)})
		}
	case chainAt >= 0:
		dec.Enclave, dec.Source = d.observe(client, chain, &dec), FromChain
	case unsigned != 0 && d.cfg.TrustUnsigned:
		dec.Enclave, dec.Source = d.observe(client, unsigned, &dec), FromUnsigned
	default:
		if unsigned != 0 {
			dec.Disagreements = append(dec.Disagreements, Disagreement{UnsignedIgnored, -1, "only unsigned entries name an enclave, and they are not trusted here"})
		}
	}
	d.count(dec.Disagreements)
	if dec.Enclave == 0 {
		return dec, ErrUndecided
	}
	return dec, nil
}

// verify checks signed entry i: its destination (this server), its
// certificate (valid, of the org CA, an intermediary's, not revoked,
// standing in the enclave it names) and its signature over the handshake,
// the entries before it and itself.
func (d *Decider) verify(noise []byte, rec *control.PathRecord, i int, now time.Time) (ca.Identity, Kind, string) {
	e := &rec.Entries[i]
	// The destination first: it costs no signature check. Without it a
	// client could have a gateway it can reach (an open relay, say) tag
	// its initiation towards an address of its own and replay the tagged
	// initiation to this server from anywhere, and be placed in that
	// gateway's enclave.
	if e.Version == control.PathVersion1 {
		return ca.Identity{}, Unbound, "a version 1 entry names no destination (upgrade the gateway that wrote it)"
	}
	if d.cfg.Addressed == nil || !d.cfg.Addressed(e.To) {
		return ca.Identity{}, Misdirected, fmt.Sprintf("the entry's gateway sent the handshake to %v, not to this server", e.To)
	}
	chain, err := x509.ParseCertificates(e.Cert) // the gateway's, then its issuing CA's, if any
	if err != nil || len(chain) == 0 {
		return ca.Identity{}, BadCertificate, fmt.Sprint("no certificate: ", err)
	}
	cert := chain[0]
	id, err := d.roots.Load().VerifyChain(chain, now)
	if err != nil {
		return ca.Identity{}, BadCertificate, err.Error()
	}
	if id.Role != ca.RoleGateway {
		return id, NotGateway, fmt.Sprintf("%s is a %s", id.Name, id.Role)
	}
	if d.cfg.Revoked != nil && d.cfg.Revoked(id.Name) {
		return id, Revoked, id.Name
	}
	if id.Enclave == 0 || id.Enclave != keys.EnclaveID(e.Enclave) {
		return id, EnclaveMismatch, fmt.Sprintf("%s stands in enclave %d, its entry names %d", id.Name, id.Enclave, e.Enclave)
	}
	pub, ok := cert.PublicKey.(ed25519.PublicKey)
	if !ok {
		return id, BadCertificate, "not an Ed25519 certificate"
	}
	m, err := control.PathSignedBytes(noise, rec.PriorBytes(i), e)
	if err != nil || !ed25519.Verify(pub, m, e.Signature[:]) {
		return id, BadSignature, id.Name
	}
	return id, "", ""
}

func (d *Decider) count(ds []Disagreement) {
	if len(ds) == 0 {
		return
	}
	d.mu.Lock()
	for _, x := range ds {
		d.counts[x.Kind]++
	}
	d.mu.Unlock()
}

// window holds the recent observations of one initiator, oldest first.
type window struct {
	seen []keys.EnclaveID
}

// observe records e for the initiator and returns the window's majority
// (ties go to the most recent), noting a conflict when e is not it.
func (d *Decider) observe(client ca.Identity, e keys.EnclaveID, dec *Decision) keys.EnclaveID {
	key := client.String()
	d.mu.Lock()
	defer d.mu.Unlock()
	w := d.windows[key]
	if w == nil {
		if len(d.windows) >= d.cfg.MaxInitiators {
			clear(d.windows) // bounded; windows rebuild from the next handshakes
		}
		w = &window{}
		d.windows[key] = w
	}
	w.seen = append(w.seen, e)
	if len(w.seen) > d.cfg.Window {
		w.seen = append(w.seen[:0], w.seen[len(w.seen)-d.cfg.Window:]...)
	}
	counts := map[keys.EnclaveID]int{}
	best, bestN := e, 0
	for k := len(w.seen) - 1; k >= 0; k-- { // newest first: a tie keeps the newer
		v := w.seen[k]
		counts[v]++
		if counts[v] > bestN {
			best, bestN = v, counts[v]
		}
	}
	if best != e {
		dec.Disagreements = append(dec.Disagreements, Disagreement{Conflict, -1, fmt.Sprintf("this path says %d, recent ones mostly %d", e, best)})
	}
	return best
}
