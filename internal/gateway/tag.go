package gateway

import (
	"net/netip"

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
	// Each tagged initiation costs a signature (and, asking for keys, a
	// session of the gateway's own): a source sending more than its share
	// has the rest dropped (its initiator tries again). Responses come
	// from servers answering those, and are not limited.
	if h.Type == control.TypeInitiation && !g.tagBudget.allow(src.Addr(), g.cfg.Now()) {
		g.metrics.control("rate_limited")
		return nil, false
	}
	g.amp.received(dst.Addr(), len(msg))
	out, needKey, err := g.tag(msg, buf, h.Type, dst)
	if err != nil {
		// A handshake that cannot take another entry (full, too long)
		// passes untagged: the server decides without this gateway.
		g.metrics.control("untagged")
		g.log.Debug("handshake not tagged", "from", src, "to", dst, "err", err)
		g.amp.spend(dst.Addr(), len(msg))
		return msg, true
	}
	if !g.amp.spend(dst.Addr(), len(out)) {
		// Towards an address that never answered as a server, the entry
		// would make the gateway send more than ampFactor times what it
		// got (amplify.go): the handshake goes on as it came.
		g.metrics.control("untagged_amplification")
		g.amp.spend(dst.Addr(), len(msg))
		return msg, true
	}
	g.metrics.control("tagged")
	if needKey && h.Type == control.TypeInitiation {
		g.servers.ensure(g, dst, true)
	}
	return out, true
}

// tag appends the gateway's entry to a handshake packet: the enclave it
// stands in, the pairs whose keys it holds, need-key when it cannot derive
// some granted pair's SA keys, the destination it sends the packet to
// (dst: a server takes the entry only when that is itself, so the tag
// cannot be replayed towards another server), its certificate and its
// signature over the handshake's Noise message, the entries before and
// the entry.
func (g *Gateway) tag(msg, buf []byte, t control.Type, dst netip.AddrPort) ([]byte, bool, error) {
	var noise []byte
	var rec control.PathRecord
	switch t {
	case control.TypeInitiation:
		in, err := control.ParseInitiation(msg)
		if err != nil {
			return nil, false, err
		}
		noise, rec = in.Noise, in.Path
	default:
		resp, err := control.ParseResponse(msg)
		if err != nil {
			return nil, false, err
		}
		noise, rec = resp.Noise, resp.Path
	}
	at, err := control.PathOffset(msg)
	if err != nil {
		return nil, false, err
	}
	pairs, missing := g.keys.entryPairs()
	needKey := g.cfg.NoDerive || missing
	creds := g.creds.Load()
	e := control.PathEntry{Flags: control.PathSigned, Enclave: uint16(g.id.Enclave), Pairs: pairs, To: dst, Cert: creds.CertDER}
	if needKey {
		e.Flags |= control.PathNeedKey
	}
	if err := discovery.SignEntry(creds.Key, noise, &rec, &e); err != nil {
		return nil, false, err
	}
	out, err := control.AppendEntry(append(buf[:0], msg...), at, &e)
	if err != nil {
		return nil, false, err
	}
	return out, needKey, nil
}
