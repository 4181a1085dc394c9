package fastaes

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"encoding/json"
	"errors"
	"math/rand/v2"
	"testing"

	"github.com/enclavekeys/enclave/internal/testvec"
)

type wycheproofAEAD struct {
	NumberOfTests int `json:"numberOfTests"`
	TestGroups    []struct {
		KeySize int `json:"keySize"`
		IvSize  int `json:"ivSize"`
		TagSize int `json:"tagSize"`
		Tests   []struct {
			TcID    int      `json:"tcId"`
			Comment string   `json:"comment"`
			Flags   []string `json:"flags"`
			Key     string   `json:"key"`
			Iv      string   `json:"iv"`
			Aad     string   `json:"aad"`
			Msg     string   `json:"msg"`
			Ct      string   `json:"ct"`
			Tag     string   `json:"tag"`
			Result  string   `json:"result"`
		} `json:"tests"`
	} `json:"testGroups"`
}

// TestGCMWycheproof runs every case of Wycheproof's aes_gcm_test.json,
// sealing and opening the valid ones and refusing every invalid one.
func TestGCMWycheproof(t *testing.T) {
	var f wycheproofAEAD
	if err := json.Unmarshal(testvec.Read(t, "wycheproof/aes_gcm_test.json"), &f); err != nil {
		t.Fatal(err)
	}
	ran := 0
	for _, grp := range f.TestGroups {
		for _, tc := range grp.Tests {
			ran++
			key, iv, aad := testvec.Hex(t, tc.Key), testvec.Hex(t, tc.Iv), testvec.Hex(t, tc.Aad)
			msg, ct, tag := testvec.Hex(t, tc.Msg), testvec.Hex(t, tc.Ct), testvec.Hex(t, tc.Tag)
			sealed := append(append([]byte{}, ct...), tag...)
			var g GCM
			if err := g.Init(key); err != nil {
				t.Fatalf("tc %d: Init: %v", tc.TcID, err)
			}
			switch tc.Result {
			case "valid":
				got, err := g.Seal(nil, iv, msg, aad)
				if err != nil || !bytes.Equal(got, sealed) {
					t.Errorf("tc %d (%s): Seal = %x, %v; want %x", tc.TcID, tc.Comment, got, err, sealed)
				}
				pt, err := g.Open(nil, iv, sealed, aad)
				if err != nil || !bytes.Equal(pt, msg) {
					t.Errorf("tc %d (%s): Open = %x, %v; want %x", tc.TcID, tc.Comment, pt, err, msg)
				}
			case "invalid":
				if pt, err := g.Open(nil, iv, sealed, aad); err == nil {
					t.Errorf("tc %d (%s): invalid case opened to %x", tc.TcID, tc.Comment, pt)
				}
				if len(iv) == 0 {
					if _, err := g.Seal(nil, iv, msg, aad); !errors.Is(err, ErrNonce) {
						t.Errorf("tc %d: Seal with an empty nonce: %v", tc.TcID, err)
					}
				}
			default:
				t.Fatalf("tc %d: result %q", tc.TcID, tc.Result)
			}
		}
	}
	if ran != f.NumberOfTests {
		t.Fatalf("ran %d cases, file declares %d", ran, f.NumberOfTests)
	}
}

// TestGCMMatchesCrypto compares against crypto/cipher's GCM on random keys,
// nonces, data and lengths, in place and not.
func TestGCMMatchesCrypto(t *testing.T) {
	r := rand.New(rand.NewPCG(11, 12))
	fill := func(n int) []byte {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(r.Uint32())
		}
		return b
	}
	for n := 0; n < 600; n++ {
		key := fill([]int{16, 24, 32}[n%3])
		nonceLen := NonceSize
		if n%7 == 0 {
			nonceLen = 1 + r.IntN(40)
		}
		nonce, aad, pt := fill(nonceLen), fill(r.IntN(64)), fill(r.IntN(1600))
		c, _ := aes.NewCipher(key)
		ref, _ := cipher.NewGCMWithNonceSize(c, nonceLen)
		want := ref.Seal(nil, nonce, pt, aad)
		var g GCM
		if err := g.Init(key); err != nil {
			t.Fatal(err)
		}
		got, err := g.Seal(nil, nonce, pt, aad)
		if err != nil || !bytes.Equal(got, want) {
			t.Fatalf("case %d: Seal differs from crypto/cipher (%v)", n, err)
		}
		// In place, with the tag's room in the capacity.
		buf := make([]byte, len(pt), len(pt)+TagSize)
		copy(buf, pt)
		sealed, err := g.Seal(buf[:0], nonce, buf, aad)
		if err != nil || !bytes.Equal(sealed, want) || &sealed[0] != &buf[:1][0] {
			t.Fatalf("case %d: in-place Seal (%v)", n, err)
		}
		opened, err := g.Open(sealed[:0], nonce, sealed, aad)
		if err != nil || !bytes.Equal(opened, pt) {
			t.Fatalf("case %d: in-place Open (%v)", n, err)
		}
	}
}

func TestGCMRefusals(t *testing.T) {
	var g GCM
	if _, err := g.Seal(nil, make([]byte, 12), nil, nil); !errors.Is(err, ErrNoKey) {
		t.Errorf("keyless Seal: %v", err)
	}
	if _, err := g.Open(nil, make([]byte, 12), make([]byte, 16), nil); !errors.Is(err, ErrNoKey) {
		t.Errorf("keyless Open: %v", err)
	}
	if err := g.Init(make([]byte, 20)); err == nil {
		t.Error("Init accepted a 20-byte key")
	}
	if err := g.Init(make([]byte, 32)); err != nil {
		t.Fatal(err)
	}
	nonce := make([]byte, 12)
	sealed, _ := g.Seal(nil, nonce, []byte("hello, enclave"), []byte("hdr"))
	if _, err := g.Open(nil, nonce, sealed[:15], nil); !errors.Is(err, ErrLength) {
		t.Errorf("short ciphertext: %v", err)
	}
	// Every single-bit flip of ciphertext, tag, nonce or AAD is refused and
	// leaves no plaintext behind.
	for i := 0; i < len(sealed)*8; i++ {
		bad := bytes.Clone(sealed)
		bad[i/8] ^= 1 << (i % 8)
		out := make([]byte, 0, len(bad))
		if _, err := g.Open(out, nonce, bad, []byte("hdr")); !errors.Is(err, ErrOpen) {
			t.Fatalf("flip of bit %d: %v", i, err)
		}
		if !bytes.Equal(out[:cap(out)-TagSize], make([]byte, cap(out)-TagSize)) {
			t.Fatal("unauthenticated plaintext left in the output")
		}
	}
	if _, err := g.Open(nil, []byte("other nonce!"), sealed, []byte("hdr")); !errors.Is(err, ErrOpen) {
		t.Errorf("other nonce: %v", err)
	}
	if _, err := g.Open(nil, nonce, sealed, []byte("hdR")); !errors.Is(err, ErrOpen) {
		t.Errorf("other AAD: %v", err)
	}
	// Inexact overlap is refused rather than corrupting data.
	buf := make([]byte, 64)
	if _, err := g.Seal(buf[1:1], nonce, buf[:32], nil); !errors.Is(err, ErrOverlap) {
		t.Errorf("overlapping Seal: %v", err)
	}
	if _, err := g.Seal(buf[40:40], nonce, buf[:8], buf[41:45]); !errors.Is(err, ErrOverlap) {
		t.Errorf("output over AAD: %v", err)
	}
}

func TestGCMNoAllocs(t *testing.T) {
	if !useGCMAsm {
		t.Skip("no AES-NI/PCLMULQDQ assembly here: the crypto/cipher fallback allocates by design")
	}
	key, nonce, aad := make([]byte, 32), make([]byte, 12), make([]byte, 24)
	buf := make([]byte, 1400, 1400+TagSize)
	var g GCM
	n := testing.AllocsPerRun(50, func() {
		_ = g.Init(key)
		s, _ := g.Seal(buf[:0], nonce, buf, aad)
		_, _ = g.Open(s[:0], nonce, s, aad)
	})
	if n != 0 {
		t.Fatalf("Init+Seal+Open allocate %v times", n)
	}
}

func FuzzGCMOpen(f *testing.F) {
	var g GCM
	_ = g.Init(make([]byte, 32))
	sealed, _ := g.Seal(nil, make([]byte, 12), []byte("seed"), nil)
	f.Add(make([]byte, 12), sealed, []byte(nil))
	f.Add([]byte{}, []byte{1, 2, 3}, []byte{4})
	f.Fuzz(func(t *testing.T, nonce, ct, aad []byte) {
		pt, err := g.Open(nil, nonce, ct, aad)
		if err == nil {
			// Only what was sealed under this key opens: check by resealing.
			again, _ := g.Seal(nil, nonce, pt, aad)
			if !bytes.Equal(again, ct) {
				t.Fatal("opened a ciphertext that does not reseal to itself")
			}
		}
	})
}

func BenchmarkGCMInit(b *testing.B) {
	for _, size := range []int{16, 32} {
		key := make([]byte, size)
		b.Run(map[int]string{16: "aes128", 32: "aes256"}[size], func(b *testing.B) {
			var g GCM
			b.ReportAllocs()
			for b.Loop() {
				_ = g.Init(key)
			}
		})
	}
	b.Run("crypto-cipher-aes256", func(b *testing.B) {
		key := make([]byte, 32)
		b.ReportAllocs()
		for b.Loop() {
			c, _ := aes.NewCipher(key)
			_, _ = cipher.NewGCM(c)
		}
	})
}
