package orgtest

import (
	"testing"

	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/packet"
)

// Craft seals a data packet as a client holding the SA's key can make
// one: any VC, SPI index and IV, the inner packet given, and in the
// ciphertext the bytes of its choosing at the offsets of plant (offsets
// in the packet, inside its encrypted part): the inner bytes there are
// set so that they encrypt to them. That is how a key holder makes the
// bytes of a run show PSP headers where it likes. The key derives from
// the org key at generation gen (PSP v1).
func Craft(t testing.TB, org keys.Key, gen keys.Generation, vc keys.VC, index uint32, iv uint64, inner []byte, plant map[int][]byte) []byte {
	t.Helper()
	spi, ck := SAKey(t, org, vc, gen, index, keys.PSPv1)
	aead, err := packet.NewAEAD(keys.PSPv1, ck.Bytes())
	if err != nil {
		t.Fatal(err)
	}
	h := packet.Header{NextHeader: packet.NextIPv4, Version: keys.PSPv1, SPI: spi, IV: iv, VC: vc}
	seal := func(in []byte) []byte {
		out, err := packet.Seal(make([]byte, len(in)+packet.Overhead), &h, aead, in)
		if err != nil {
			t.Fatal(err)
		}
		return out
	}
	in := append([]byte(nil), inner...)
	if len(plant) > 0 {
		stream := seal(make([]byte, len(in)))[packet.HeaderLen:] // the keystream: zeros encrypted
		for off, want := range plant {
			at := off - packet.HeaderLen
			if at < 0 || at+len(want) > len(in) {
				t.Fatalf("Craft: %d bytes at %d lie outside the ciphertext of a %d-byte packet", len(want), off, len(in)+packet.Overhead)
			}
			for i, b := range want {
				in[at+i] = b ^ stream[at+i]
			}
		}
	}
	return seal(in)
}
