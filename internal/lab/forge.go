package lab

import (
	"net/netip"

	"github.com/enclavekeys/enclave/internal/agent"
	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/packet"
	"github.com/enclavekeys/enclave/internal/sa"
)

// sealWith seals a small inner packet (from the client's overlay address
// to the server's) on the client's sending SA as, under the SA key that
// pairKey derives: the bytes a genuine packet of the SA would have at IV 1.
func sealWith(pairKey []byte, as *agent.Association) ([]byte, error) {
	ek, err := keys.KeyFromBytes(pairKey)
	clear(pairKey)
	if err != nil {
		return nil, err
	}
	defer ek.Zero()
	sk, err := keys.ServerKey(&ek, as.VC)
	if err != nil {
		return nil, err
	}
	defer sk.Zero()
	ck, err := keys.SAKeyFromServer(&sk, as.SendSPI, keys.PSPv1)
	if err != nil {
		return nil, err
	}
	defer ck.Zero()
	out, err := sa.NewOutbound(sa.Config{SPI: as.SendSPI, VC: as.VC, Version: keys.PSPv1, Key: ck.Bytes()})
	if err != nil {
		return nil, err
	}
	inner := make([]byte, 28) // IPv4 + UDP, 100.64.1.101 -> 100.64.2.20
	inner[0], inner[3], inner[8], inner[9] = 0x45, 28, 64, 17
	src, dst := netip.MustParseAddr("100.64.1.101").As4(), overlay["app1"].As4()
	copy(inner[12:], src[:])
	copy(inner[16:], dst[:])
	return out.Seal(make([]byte, packet.Overhead+len(inner)), packet.NextIPv4, inner)
}
