package gateway

import (
	"errors"
	"net/netip"
	"time"

	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/control"
	"github.com/enclavekeys/enclave/internal/discovery"
)

// onControl handles a control datagram on its way from src to dst: a
// handshake packet (initiation or response) gets the gateway's signed path
// entry appended, written into buf; anything else of the protocol passes
// as it came. A datagram that is not a control message is dropped.
// An initiation that asks for keys also makes sure the gateway has a
// session with the server it goes to, for the keys to come over.
func (g *Gateway) onControl(msg, buf []byte, src, dst netip.AddrPort) ([]byte, bool) {
	h, err := control.ParseHeader(msg)
	if err != nil {
		g.metrics.control("malformed")
		return nil, false
	}
	if (h.Type != control.TypeInitiation && h.Type != control.TypeResponse) || g.id.Role == ca.RoleMonitor {
		g.metrics.control("passed")
		return msg, true
	}
	// Each tagged handshake costs a signature (and an initiation asking
	// for keys a session of the gateway's own): a source sending more
	// than its share has the rest of its initiations dropped (its
	// initiator tries again) and its Responses passed untagged (no one
	// reads a Response's path record).
	if !g.tagBudget.allow(src.Addr(), g.cfg.Now()) {
		g.metrics.control("rate_limited")
		if h.Type == control.TypeInitiation {
			return nil, false
		}
		return msg, true
	}
	g.amp.received(dst.Addr(), len(msg))
	out, apart, needKey, err := g.tag(msg, buf, h.Type, dst)
	switch {
	case errors.Is(err, errNoCredit):
		// Towards an address that never answered as a server, the entry
		// would make the gateway send more than ampFactor times what it
		// got (amplify.go): the handshake goes on as it came.
		g.metrics.control("untagged_amplification")
		g.amp.spend(dst.Addr(), len(msg))
		return msg, true
	case errors.Is(err, errOversize) && h.Type == control.TypeResponse:
		g.metrics.control("untagged_response") // by design: below
		g.amp.spend(dst.Addr(), len(msg))
		return msg, true
	case err != nil:
		// A handshake that cannot take another entry (full, too long)
		// passes untagged: the server decides without this gateway.
		g.metrics.control("untagged")
		if errors.Is(err, errOversize) {
			g.oversize(h.Type, len(msg), src, dst)
		} else {
			g.log.Debug("handshake not tagged", "from", src, "to", dst, "err", err)
		}
		g.amp.spend(dst.Addr(), len(msg))
		return msg, true
	}
	g.amp.spend(dst.Addr(), len(out)+len(apart)) // covered: tag checked
	if apart != nil {
		// The entry goes ahead of the handshake, which holds its stub.
		if _, err := g.own.WriteToUDPAddrPort(apart, dst); err != nil {
			g.metrics.control("untagged")
			return msg, true
		}
		g.metrics.control("tagged_apart")
	}
	g.metrics.control("tagged")
	if needKey && h.Type == control.TypeInitiation {
		g.servers.ensure(g, dst, true, src.Addr())
	}
	return out, true
}

// errOversize: the handshake has no room for the gateway's entry, not
// even its stub, within control.MaxHandshake (a Response: for its entry).
var errOversize = errors.New("gateway: no room for an entry within a 1280-byte packet")

// errNoCredit: the entry would take the gateway past what it may send
// towards an address that never answered as a server (amplify.go).
var errNoCredit = errors.New("gateway: no credit towards this address for an entry")

// oversize says in the log, at most every ten seconds, that a handshake
// passed untagged for want of room, and what to do.
func (g *Gateway) oversize(t control.Type, n int, src, dst netip.AddrPort) {
	now := g.cfg.Now()
	g.sizeMu.Lock()
	warn := now.Sub(g.sizeWarned) >= 10*time.Second
	if warn {
		g.sizeWarned = now
	}
	g.sizeMu.Unlock()
	if !warn || t != control.TypeInitiation {
		return // a Response's path record is for no one to read
	}
	g.log.Warn("a handshake passed untagged: it has no room for this gateway's entry within a 1280-byte packet (handshakes never rely on IP fragmentation), so the server cannot learn the client's enclave from this gateway",
		"bytes", n, "max", control.MaxHandshake, "from", src, "to", dst,
		"what to do", "give the client a certificate with a shorter chain, or its enclave in the certificate, or fewer gateways on its path")
}

// tag appends the gateway's entry to a handshake packet: the enclave it
// stands in, the pairs whose keys it holds, need-key when it cannot derive
// some granted pair's SA keys, the destination it sends the packet to
// (dst: a server takes the entry only when that is itself, so the tag
// cannot be replayed towards another server), its certificate and its
// signature over the handshake's Noise message, the entries before and
// the entry.
func (g *Gateway) tag(msg, buf []byte, t control.Type, dst netip.AddrPort) (out, apart []byte, needKey bool, err error) {
	var noise []byte
	var rec control.PathRecord
	var sender uint32
	switch t {
	case control.TypeInitiation:
		in, err := control.ParseInitiation(msg)
		if err != nil {
			return nil, nil, false, err
		}
		noise, rec, sender = in.Noise, in.Path, in.Sender
	default:
		resp, err := control.ParseResponse(msg)
		if err != nil {
			return nil, nil, false, err
		}
		noise, rec = resp.Noise, resp.Path
	}
	at, err := control.PathOffset(msg)
	if err != nil {
		return nil, nil, false, err
	}
	// Room first: a handshake that cannot take even a stub costs no
	// signature.
	if len(msg)+control.StubLen > control.MaxHandshake {
		return nil, nil, false, errOversize
	}
	pairs, missing := g.keys.entryPairs()
	needKey = g.cfg.NoDerive || missing
	creds := g.creds.Load()
	e := control.PathEntry{Flags: control.PathSigned, Enclave: uint16(g.id.Enclave), Pairs: pairs, To: dst, Cert: creds.CertDER}
	if needKey {
		e.Flags |= control.PathNeedKey
	}
	// Where the entry goes, and whether the gateway may send it, are
	// settled before the signature is made: an entry's length does not
	// depend on its signature's bytes.
	size, err := control.EntryBytes(nil, &e)
	if err != nil {
		return nil, nil, false, err
	}
	inRecord := len(msg)+len(size) <= control.MaxHandshake
	sending := len(msg) + len(size)
	switch {
	case inRecord:
	case t != control.TypeInitiation:
		// A Response's path record is for no one to read: it goes
		// untagged rather than with an entry apart.
		return nil, nil, false, errOversize
	default:
		sending = len(msg) + control.StubLen + control.HeaderLen + len(size)
	}
	if !g.amp.has(dst.Addr(), sending) {
		return nil, nil, false, errNoCredit
	}
	if err := discovery.SignEntry(creds.Key, noise, &rec, &e); err != nil {
		return nil, nil, false, err
	}
	raw, err := control.EntryBytes(nil, &e)
	if err != nil {
		return nil, nil, false, err
	}
	if inRecord {
		out, err = control.AppendEntry(append(buf[:0], msg...), at, &e)
		return out, nil, needKey, err
	}
	// Too large with the entry: the entry goes apart, ahead of the
	// handshake, which carries its stub.
	if out, err = control.AppendStub(append(buf[:0], msg...), at, raw); err != nil {
		return nil, nil, false, err
	}
	if apart, err = control.AppendEntryMessage(nil, sender, raw); err != nil {
		return nil, nil, false, err
	}
	return out, apart, needKey, nil
}
