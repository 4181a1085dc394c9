package packet

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"errors"
	"testing"

	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/testvec"
)

func TestAEADInit(t *testing.T) {
	tests := []struct {
		name string
		v    keys.Version
		n    int
		want error
	}{
		{"v0 16 bytes", keys.PSPv0, 16, nil},
		{"v1 32 bytes", keys.PSPv1, 32, nil},
		{"v0 32 bytes", keys.PSPv0, 32, ErrKeyLength},
		{"v1 16 bytes", keys.PSPv1, 16, ErrKeyLength},
		{"v1 empty", keys.PSPv1, 0, ErrKeyLength},
		{"version 2", 2, 32, ErrVersion},
	}
	for _, tt := range tests {
		a, err := NewAEAD(tt.v, make([]byte, tt.n))
		if !errors.Is(err, tt.want) {
			t.Errorf("%s: %v, want %v", tt.name, err, tt.want)
		}
		if (err == nil) != a.Ready() {
			t.Errorf("%s: Ready() = %v after error %v", tt.name, a.Ready(), err)
		}
	}
	// A failed re-key leaves no key behind.
	a, _ := NewAEAD(keys.PSPv1, make([]byte, 32))
	if err := a.Init(keys.PSPv1, make([]byte, 5)); err == nil || a.Ready() {
		t.Fatalf("failed Init: %v, ready %v", err, a.Ready())
	}
	a.Reset()
	if a.Ready() {
		t.Fatal("ready after Reset")
	}
}

// TestAgainstCryptoCipher: a packet is exactly crypto/cipher's AES-GCM
// with nonce SPI || IV and the header and VC as additional data.
func TestAgainstCryptoCipher(t *testing.T) {
	ck := testvec.Hex(t, designCK)
	b, _ := aes.NewCipher(ck)
	g, _ := cipher.NewGCM(b)
	inner := bytes.Repeat([]byte{0x45}, 300)
	h := designHeader
	h.IV = 77
	pkt, err := Seal(make([]byte, Overhead+len(inner)), &h, gcm(t, designCK), inner)
	if err != nil {
		t.Fatal(err)
	}
	nonce := h.Nonce()
	want := g.Seal(nil, nonce[:], inner, pkt[:HeaderLen])
	if !bytes.Equal(pkt[HeaderLen:], want) {
		t.Fatal("sealed bytes differ from crypto/cipher's AES-GCM")
	}
}

// TestOpenBuffers: dst may be the sealed bytes themselves or separate
// memory; any other overlap is refused before any byte is written.
func TestOpenBuffers(t *testing.T) {
	key := gcm(t, designCK)
	good := testvec.Hex(t, designPacket)
	inner := testvec.Hex(t, designInner)
	parse := func() (*Parsed, []byte) {
		pkt := bytes.Clone(good)
		var p Parsed
		if err := Parse(&p, pkt); err != nil {
			t.Fatal(err)
		}
		return &p, pkt
	}
	p, _ := parse()
	if got, err := Open(make([]byte, 0, 100), p, key); err != nil || !bytes.Equal(got, inner) {
		t.Fatalf("separate dst: %x %v", got, err)
	}
	p, pkt := parse()
	if _, err := Open(p.Sealed[1:1], p, key); err != ErrBuffer {
		t.Fatalf("shifted dst: %v, want ErrBuffer", err)
	}
	if _, err := Open(pkt[2:2], p, key); err != ErrBuffer {
		t.Fatalf("dst over the header: %v, want ErrBuffer", err)
	}
	if !bytes.Equal(pkt, good) {
		t.Fatal("a refused Open wrote into the packet")
	}
	// A forged packet opened in place leaves zeros, not unauthenticated
	// plaintext.
	p, pkt = parse()
	pkt[len(pkt)-1] ^= 1
	if _, err := Open(p.Sealed[:0], p, key); err != ErrAuth {
		t.Fatalf("forged: %v, want ErrAuth", err)
	}
	if !bytes.Equal(p.Sealed[:len(inner)], make([]byte, len(inner))) {
		t.Fatal("a forged packet's bytes were left decrypted in the buffer")
	}
	// The version must match the key.
	p, _ = parse()
	p.Version = keys.PSPv0
	if _, err := Open(nil, p, key); err != ErrKeyLength {
		t.Fatalf("v0 packet under a v1 key: %v", err)
	}
	if _, err := Open(nil, p, nil); err != ErrKeyLength {
		t.Fatalf("nil key: %v", err)
	}
}

// BenchmarkAEADInit is what preparing an SA key costs (crypto/aes's key
// schedules plus crypto/cipher's GCM tables): the price of a cache miss on
// top of the derivation.
func BenchmarkAEADInit(b *testing.B) {
	key := make([]byte, 32)
	var a AEAD
	b.ReportAllocs()
	for b.Loop() {
		if err := a.Init(keys.PSPv1, key); err != nil {
			b.Fatal(err)
		}
	}
}
