package agent

import (
	"encoding/binary"
	"errors"

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
	var p packet.Parsed
	for {
		n, src, err := a.data.ReadFromUDPAddrPort(buf)
		if err != nil {
			return
		}
		pkt := buf[:n]
		if n < packet.HeaderLen+packet.TagLen {
			a.metrics.drop("short")
			continue
		}
		spi := keys.SPI(binary.BigEndian.Uint32(pkt[4:8]))
		a.mu.RLock()
		c := a.t.bySPI[spi]
		a.mu.RUnlock()
		if c == nil {
			a.metrics.drop("unknown_sa")
			continue
		}
		var inner []byte
		if c.server {
			inner, err = a.opener.Open(&p, pkt)
			switch {
			case err != nil:
			case p.VC != c.vc || p.SPI != c.recvSPI:
				err = sa.ErrWrongSA
			case !c.accept(p.IV):
				err = sa.ErrReplay
			}
		} else {
			inner, err = c.in.Open(&p, pkt)
		}
		if err != nil {
			a.metrics.drop(dropCause(err))
			continue
		}
		if s, ok := ipSource(inner); !ok || s != c.overlay {
			a.metrics.drop("spoofed_source")
			continue
		}
		if ep := c.dataEndpoint(); ep != src {
			c.endpoint.Store(&src) // the peer roamed; its packet authenticated
		}
		off := len(p.AAD)
		if _, err := a.tun.Write([][]byte{pkt[:off+len(inner)]}, off); err != nil {
			a.metrics.drop("stack")
			continue
		}
		a.metrics.packets.WithLabelValues("received").Inc()
		a.metrics.bytes.WithLabelValues("received").Add(float64(len(inner)))
	}
}

// dropCause names a receive error as a metric label.
func dropCause(err error) string {
	switch {
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
