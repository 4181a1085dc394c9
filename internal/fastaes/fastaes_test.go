package fastaes

import (
	"crypto/aes"
	"errors"
	"math/rand/v2"
	"testing"
)

// TestMatchesCryptoAES checks every key size against the standard library
// on pseudo-random keys and blocks.
func TestMatchesCryptoAES(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for _, size := range []int{16, 24, 32} {
		for n := 0; n < 2000; n++ {
			key := make([]byte, size)
			for i := range key {
				key[i] = byte(r.Uint32())
			}
			var in, got, want [BlockSize]byte
			for i := range in {
				in[i] = byte(r.Uint32())
			}
			checkOne(t, key, &in, &got, &want)
		}
	}
}

func checkOne(t *testing.T, key []byte, in, got, want *[BlockSize]byte) {
	t.Helper()
	var b Block
	if err := b.Init(key); err != nil {
		t.Fatalf("Init(%d bytes): %v", len(key), err)
	}
	ref, err := aes.NewCipher(key)
	if err != nil {
		t.Fatal(err)
	}
	b.Encrypt(got, in)
	ref.Encrypt(want[:], in[:])
	if *got != *want {
		t.Fatalf("key size %d: got %x, want %x", len(key), *got, *want)
	}
	// In place.
	*got = *in
	b.Encrypt(got, got)
	if *got != *want {
		t.Fatalf("key size %d in place: got %x, want %x", len(key), *got, *want)
	}
}

// TestFIPS197 is the AES-256 example of FIPS 197 appendix C.3.
func TestFIPS197(t *testing.T) {
	key := []byte{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31}
	in := [16]byte{0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff}
	want := [16]byte{0x8e, 0xa2, 0xb7, 0xca, 0x51, 0x67, 0x45, 0xbf, 0xea, 0xfc, 0x49, 0x90, 0x4b, 0x49, 0x60, 0x89}
	var b Block
	if err := b.Init(key); err != nil {
		t.Fatal(err)
	}
	var out [16]byte
	b.Encrypt(&out, &in)
	if out != want {
		t.Fatalf("got %x, want %x", out, want)
	}
}

func TestBadKeySize(t *testing.T) {
	for _, n := range []int{0, 1, 15, 17, 31, 33, 64} {
		var b Block
		err := b.Init(make([]byte, n))
		var ks KeySizeError
		if !errors.As(err, &ks) || int(ks) != n {
			t.Errorf("Init(%d bytes) = %v, want KeySizeError(%d)", n, err, n)
		}
		// An unusable block must not leak anything: it yields zeros.
		in := [16]byte{1, 2, 3}
		out := [16]byte{9}
		b.Encrypt(&out, &in)
		if out != ([16]byte{}) {
			t.Errorf("Encrypt after failed Init = %x, want zeros", out)
		}
	}
}

func TestReInitAndReset(t *testing.T) {
	var b Block
	var got, want [16]byte
	in := [16]byte{7}
	for _, size := range []int{32, 16, 24, 32} {
		key := make([]byte, size)
		key[0] = byte(size)
		checkOne(t, key, &in, &got, &want)
		if err := b.Init(key); err != nil {
			t.Fatal(err)
		}
	}
	b.Reset()
	if b != (Block{}) {
		t.Fatal("Reset left state behind")
	}
}

func TestNoAllocs(t *testing.T) {
	if !useAsm {
		t.Skip("no AES-NI: the crypto/aes fallback allocates by design")
	}
	key := make([]byte, 32)
	var b Block
	var blk [16]byte
	n := testing.AllocsPerRun(100, func() {
		_ = b.Init(key)
		b.Encrypt(&blk, &blk)
	})
	if n != 0 {
		t.Fatalf("Init+Encrypt allocate %v times, want 0", n)
	}
}

func FuzzMatchesCryptoAES(f *testing.F) {
	f.Add(make([]byte, 32), make([]byte, 16))
	f.Add(make([]byte, 16), []byte("0123456789abcdef"))
	f.Add(make([]byte, 24), []byte("0123456789abcdef"))
	f.Add([]byte("short"), []byte("0123456789abcdef"))
	f.Fuzz(func(t *testing.T, key, in []byte) {
		if len(in) != BlockSize {
			return
		}
		var b Block
		err := b.Init(key)
		ref, refErr := aes.NewCipher(key)
		if (err == nil) != (refErr == nil) {
			t.Fatalf("Init error %v, crypto/aes error %v", err, refErr)
		}
		if err != nil {
			return
		}
		var got, want [BlockSize]byte
		b.Encrypt(&got, (*[BlockSize]byte)(in))
		ref.Encrypt(want[:], in)
		if got != want {
			t.Fatalf("got %x, want %x", got, want)
		}
	})
}

func BenchmarkInit256(b *testing.B) {
	key := make([]byte, 32)
	var blk Block
	b.ReportAllocs()
	for b.Loop() {
		_ = blk.Init(key)
	}
}

func BenchmarkEncrypt256(b *testing.B) {
	var blk Block
	_ = blk.Init(make([]byte, 32))
	var x [16]byte
	b.SetBytes(BlockSize)
	b.ReportAllocs()
	for b.Loop() {
		blk.Encrypt(&x, &x)
	}
}

// TestEncryptXOR3 checks E(a ^ b ^ c) against crypto/aes, including with
// the output aliasing an input, as CMAC's chaining does.
func TestEncryptXOR3(t *testing.T) {
	r := rand.New(rand.NewPCG(9, 10))
	fill := func(b []byte) {
		for i := range b {
			b[i] = byte(r.Uint32())
		}
	}
	for _, size := range []int{16, 24, 32} {
		for n := 0; n < 500; n++ {
			key := make([]byte, size)
			fill(key)
			var a, b, c, want, got [BlockSize]byte
			fill(a[:])
			fill(b[:])
			fill(c[:])
			ref, _ := aes.NewCipher(key)
			var x [BlockSize]byte
			for i := range x {
				x[i] = a[i] ^ b[i] ^ c[i]
			}
			ref.Encrypt(want[:], x[:])
			var blk Block
			if err := blk.Init(key); err != nil {
				t.Fatal(err)
			}
			blk.EncryptXOR3(&got, &a, &b, &c)
			if got != want {
				t.Fatalf("EncryptXOR3: got %x, want %x", got, want)
			}
			// The pair form: the second lane on swapped inputs, and with
			// the first output aliasing the second lane's input.
			var got2, want2 [BlockSize]byte
			ref.Encrypt(want2[:], x[:])
			blk.EncryptXOR3x2(&got, &a, &b, &c, &got2, &c, &a, &b)
			if got != want || got2 != want2 {
				t.Fatalf("EncryptXOR3x2: got %x %x, want %x", got, got2, want)
			}
			other := a
			other[0] ^= 1
			var wantOther [BlockSize]byte
			xo := x
			xo[0] ^= 1
			ref.Encrypt(wantOther[:], xo[:])
			blk.EncryptXOR3x2(&other, &a, &b, &c, &got2, &other, &b, &c)
			if other != want || got2 != wantOther {
				t.Fatalf("EncryptXOR3x2 aliased: got %x %x, want %x %x", other, got2, want, wantOther)
			}
			blk.EncryptXOR3(&a, &a, &b, &c)
			if a != want {
				t.Fatalf("EncryptXOR3 in place: got %x, want %x", a, want)
			}
		}
	}
	var unset Block
	out := [BlockSize]byte{1}
	unset.EncryptXOR3(&out, &out, &out, &out)
	out2 := [BlockSize]byte{2}
	unset.EncryptXOR3x2(&out, &out, &out, &out, &out2, &out2, &out2, &out2)
	if out != ([BlockSize]byte{}) || out2 != ([BlockSize]byte{}) {
		t.Fatal("EncryptXOR3 on a keyless block must yield zeros")
	}
}

// BenchmarkCryptoAESNewCipher256 is the key set-up fastaes replaces, in the
// same run: crypto/aes allocates each cipher and also expands the
// decryption schedule.
func BenchmarkCryptoAESNewCipher256(b *testing.B) {
	key := make([]byte, 32)
	b.ReportAllocs()
	for b.Loop() {
		c, err := aes.NewCipher(key)
		if err != nil || c == nil {
			b.Fatal(err)
		}
	}
}
