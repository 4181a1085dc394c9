package agent

import (
	"encoding/binary"
	"errors"
	"net/netip"

	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/packet"
	"github.com/enclavekeys/enclave/internal/sa"
)

// readData is the receive path: PSP packets from the data port, opened
// under their SA (the client's own CK, or the server's key through the
// stateless opener and the SA's replay window), checked to come from the
// peer's overlay address, and handed to the network stack.
func (a *Agent) readData() {
	buf := make([]byte, 65535)
	out := [][]byte{nil} // reused: a slice literal per packet would allocate
	var p packet.Parsed
	for {
		n, src, err := a.data.ReadFromUDPAddrPort(buf)
		if err != nil {
			return
		}
		pkt := buf[:n]
		inner, err := a.open(&p, pkt, src)
		if err != nil {
			a.metrics.drop(dropCause(err))
			continue
		}
		off := len(p.AAD)
		out[0] = pkt[:off+len(inner)]
		if _, err := a.tun.Write(out, off); err != nil {
			a.metrics.drop("stack")
			continue
		}
		a.metrics.recvPackets.Inc()
		a.metrics.recvBytes.Add(float64(len(inner)))
	}
}

// Receive errors of the agent's own (the packet layer's and the SA's
// have theirs).
var (
	errShort        = errors.New("agent: packet too short")
	errUnknownSA    = errors.New("agent: no SA with this SPI")
	errSpoofedInner = errors.New("agent: inner source is not the peer's overlay address")
)

// open authenticates and decrypts one data packet in place and returns
// its inner packet, or why it is dropped.
func (a *Agent) open(p *packet.Parsed, pkt []byte, src netip.AddrPort) ([]byte, error) {
	if len(pkt) < packet.HeaderLen+packet.TagLen {
		return nil, errShort
	}
	spi := keys.SPI(binary.BigEndian.Uint32(pkt[4:8]))
	a.mu.RLock()
	c := a.t.bySPI[spi]
	a.mu.RUnlock()
	if c == nil {
		return nil, errUnknownSA
	}
	var inner []byte
	var err error
	if c.server {
		inner, err = a.opener.Open(p, pkt)
		switch {
		case err != nil:
		case p.VC != c.vc || p.SPI != c.recvSPI:
			err = sa.ErrWrongSA
		case !c.accept(p.IV):
			err = sa.ErrReplay
		}
	} else {
		inner, err = c.in.Open(p, pkt)
	}
	if err != nil {
		return nil, err
	}
	if s, ok := ipSource(inner); !ok || s != c.overlay {
		return nil, errSpoofedInner
	}
	if c.dataEndpoint() != src {
		roamed := src // a copy, so that only a roaming packet allocates
		c.endpoint.Store(&roamed)
	}
	return inner, nil
}

// dropCause names a receive error as a metric label.
func dropCause(err error) string {
	switch {
	case errors.Is(err, errShort):
		return "short"
	case errors.Is(err, errUnknownSA):
		return "unknown_sa"
	case errors.Is(err, errSpoofedInner):
		return "spoofed_source"
	case errors.Is(err, sa.ErrReplay):
		return "replay"
	case errors.Is(err, packet.ErrAuth):
		return "auth"
	case errors.Is(err, sa.ErrWrongSA):
		return "wrong_sa"
	case errors.Is(err, sa.ErrNoKey), errors.Is(err, sa.ErrGeneration):
		return "no_key"
	}
	return packet.CauseOf(err).String()
}
