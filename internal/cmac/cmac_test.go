package cmac

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"testing"

	"crypto/aes"

	"github.com/enclavekeys/enclave/internal/testvec"
)

const (
	rfcKey = "2b7e151628aed2a6abf7158809cf4f3c"
	rfcMsg = "6bc1bee22e409f96e93d7e117393172aae2d8a571e03ac9c9eb76fac45af8e51" +
		"30c81c46a35ce411e5fbc1191a0a52eff69f2445df4f9b17ad2b417be66c3710"
)

// TestRFC4493Subkeys is RFC 4493 section 4, "Subkey Generation".
func TestRFC4493Subkeys(t *testing.T) {
	c, err := New(testvec.Hex(t, rfcKey))
	if err != nil {
		t.Fatal(err)
	}
	if got, want := hex.EncodeToString(c.k1[:]), "fbeed618357133667c85e08f7236a8de"; got != want {
		t.Errorf("K1 = %s, want %s", got, want)
	}
	if got, want := hex.EncodeToString(c.k2[:]), "f7ddac306ae266ccf90bc11ee46d513b"; got != want {
		t.Errorf("K2 = %s, want %s", got, want)
	}
}

// TestExamples holds RFC 4493 section 4 (AES-128) and the SP 800-38B
// examples for AES-192 and AES-256 (NIST's "CMAC-AES" example values), with
// message lengths 0, 16, 40 and 64 bytes.
func TestExamples(t *testing.T) {
	msg := testvec.Hex(t, rfcMsg)
	tests := []struct {
		name, key string
		tags      [4]string
	}{
		{"RFC4493/AES-128", rfcKey, [4]string{
			"bb1d6929e95937287fa37d129b756746", "070a16b46b4d4144f79bdd9dd04a287c",
			"dfa66747de9ae63030ca32611497c827", "51f0bebf7e3b9d92fc49741779363cfe"}},
		{"SP800-38B/AES-192", "8e73b0f7da0e6452c810f32b809079e562f8ead2522c6b7b", [4]string{
			"d17ddf46adaacde531cac483de7a9367", "9e99a7bf31e710900662f65e617c5184",
			"8a1de5be2eb31aad089a82e6ee908b0e", "a1d5df0eed790f794d77589659f39a11"}},
		{"SP800-38B/AES-256", "603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4", [4]string{
			"028962f61b7bf89efc6b551f4667d983", "28a7023f452e8f82bd4bf28d8c37c35c",
			"aaf3d8f1de5640c232f5b169b9c911e6", "e1992190549f6ed5696a2c056c315410"}},
	}
	for _, tt := range tests {
		c, err := New(testvec.Hex(t, tt.key))
		if err != nil {
			t.Fatal(err)
		}
		for i, n := range []int{0, 16, 40, 64} {
			var tag [Size]byte
			c.Sum(&tag, msg[:n])
			if got := hex.EncodeToString(tag[:]); got != tt.tags[i] {
				t.Errorf("%s len %d: tag %s, want %s", tt.name, n, got, tt.tags[i])
			}
			if err := c.Verify(msg[:n], testvec.Hex(t, tt.tags[i])); err != nil {
				t.Errorf("%s len %d: Verify: %v", tt.name, n, err)
			}
		}
	}
}

type wycheproofMAC struct {
	NumberOfTests int `json:"numberOfTests"`
	TestGroups    []struct {
		KeySize int `json:"keySize"`
		TagSize int `json:"tagSize"`
		Tests   []struct {
			TcID    int      `json:"tcId"`
			Comment string   `json:"comment"`
			Flags   []string `json:"flags"`
			Key     string   `json:"key"`
			Msg     string   `json:"msg"`
			Tag     string   `json:"tag"`
			Result  string   `json:"result"`
		} `json:"tests"`
	} `json:"testGroups"`
}

// TestWycheproof runs every case of Wycheproof's aes_cmac_test.json: valid
// tags must verify and match Sum; invalid ones (modified tags, bad key
// sizes) must be refused.
func TestWycheproof(t *testing.T) {
	raw := testvec.Read(t, "wycheproof/aes_cmac_test.json")
	var f wycheproofMAC
	if err := json.Unmarshal(raw, &f); err != nil {
		t.Fatal(err)
	}
	ran, valid, invalid := 0, 0, 0
	for _, g := range f.TestGroups {
		for _, tc := range g.Tests {
			ran++
			key, msg, tag := testvec.Hex(t, tc.Key), testvec.Hex(t, tc.Msg), testvec.Hex(t, tc.Tag)
			c, err := New(key)
			switch tc.Result {
			case "valid":
				valid++
				if err != nil {
					t.Errorf("tc %d (%s): New: %v", tc.TcID, tc.Comment, err)
					continue
				}
				var full [Size]byte
				c.Sum(&full, msg)
				if !bytes.Equal(full[:len(tag)], tag) {
					t.Errorf("tc %d (%s): tag %x, want %x", tc.TcID, tc.Comment, full[:len(tag)], tag)
				}
				if err := c.Verify(msg, tag); err != nil {
					t.Errorf("tc %d (%s): Verify: %v", tc.TcID, tc.Comment, err)
				}
			case "invalid":
				invalid++
				if err != nil {
					var ks aes.KeySizeError
					if !errors.As(err, &ks) {
						t.Errorf("tc %d (%s): New error %v is not a KeySizeError", tc.TcID, tc.Comment, err)
					}
					continue
				}
				if err := c.Verify(msg, tag); err == nil {
					t.Errorf("tc %d (%s): invalid tag accepted", tc.TcID, tc.Comment)
				}
			default:
				t.Errorf("tc %d: unexpected result %q", tc.TcID, tc.Result)
			}
		}
	}
	if ran != f.NumberOfTests {
		t.Fatalf("ran %d cases, file declares %d", ran, f.NumberOfTests)
	}
	t.Logf("Wycheproof AES-CMAC: %d cases (%d valid, %d invalid)", ran, valid, invalid)
}

// TestSum2 checks the paired form against Sum for every length pair up to
// four blocks, equal or not.
func TestSum2(t *testing.T) {
	c, err := New(testvec.Hex(t, "603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4"))
	if err != nil {
		t.Fatal(err)
	}
	msg := testvec.Hex(t, rfcMsg)
	for n1 := 0; n1 <= 64; n1++ {
		for _, n2 := range []int{n1, 0, 16, 17, 64} {
			m2 := make([]byte, n2)
			for i := range m2 {
				m2[i] = msg[len(msg)-1-i%len(msg)]
			}
			var a, b, wantA, wantB [Size]byte
			c.Sum2(&a, &b, msg[:n1], m2)
			c.Sum(&wantA, msg[:n1])
			c.Sum(&wantB, m2)
			if a != wantA || b != wantB {
				t.Fatalf("Sum2 lengths %d,%d: %x %x, want %x %x", n1, n2, a, b, wantA, wantB)
			}
		}
	}
}

func TestVerifyErrors(t *testing.T) {
	c, err := New(make([]byte, 32))
	if err != nil {
		t.Fatal(err)
	}
	var tag [Size]byte
	c.Sum(&tag, []byte("m"))
	for _, n := range []int{0, 1, MinTagSize - 1, Size + 1} {
		bad := make([]byte, n)
		copy(bad, tag[:])
		if err := c.Verify([]byte("m"), bad); !errors.Is(err, ErrTagSize) {
			t.Errorf("tag of %d bytes: %v, want ErrTagSize", n, err)
		}
	}
	if err := c.Verify([]byte("m"), tag[:MinTagSize]); err != nil {
		t.Errorf("truncated tag: %v", err)
	}
	tag[Size-1] ^= 1
	if err := c.Verify([]byte("m"), tag[:]); !errors.Is(err, ErrMismatch) {
		t.Errorf("flipped tag: %v, want ErrMismatch", err)
	}
	var zero CMAC
	var zt [Size]byte
	zero.Sum(&zt, nil)
	if err := zero.Verify(nil, zt[:]); !errors.Is(err, ErrNoKey) {
		t.Errorf("zero CMAC Verify: %v, want ErrNoKey", err)
	}
	if _, err := New(make([]byte, 20)); err == nil {
		t.Error("New accepted a 20-byte key")
	}
	if err := c.Init(make([]byte, 7)); err == nil || c.Verify(nil, zt[:]) != ErrNoKey {
		t.Error("failed Init must leave the CMAC keyless")
	}
}

// TestDoubleCarry checks the subkey doubling on both values of the top bit.
func TestDoubleCarry(t *testing.T) {
	var in, out [Size]byte
	in[0] = 0x80
	double(&out, &in)
	want := [Size]byte{Size - 1: 0x87}
	if out != want {
		t.Errorf("double(80..00) = %x, want %x", out, want)
	}
	in = [Size]byte{0: 0x40, Size - 1: 0x01}
	double(&out, &in)
	want = [Size]byte{0: 0x80, Size - 1: 0x02}
	if out != want {
		t.Errorf("double(40..01) = %x, want %x", out, want)
	}
}

func TestSumNoAllocs(t *testing.T) {
	c, err := New(make([]byte, 32))
	if err != nil {
		t.Fatal(err)
	}
	msg := make([]byte, 100)
	var tag [Size]byte
	if n := testing.AllocsPerRun(100, func() { c.Sum(&tag, msg) }); n != 0 {
		t.Fatalf("Sum allocates %v times, want 0", n)
	}
}

func BenchmarkSum(b *testing.B) {
	for _, n := range []int{16, 64, 1024} {
		b.Run(fmt.Sprintf("len=%d", n), func(b *testing.B) {
			c, _ := New(make([]byte, 32))
			msg := make([]byte, n)
			var tag [Size]byte
			b.SetBytes(int64(n))
			b.ReportAllocs()
			for b.Loop() {
				c.Sum(&tag, msg)
			}
		})
	}
}

// FuzzVerify feeds arbitrary keys, messages and tags: nothing panics, a
// fresh tag verifies, and the same tag with one bit flipped does not.
func FuzzVerify(f *testing.F) {
	f.Add([]byte(nil), []byte(nil), []byte(nil))
	f.Add(make([]byte, 16), []byte("message"), make([]byte, 16))
	f.Add(make([]byte, 32), make([]byte, 33), make([]byte, 8))
	f.Add(make([]byte, 24), make([]byte, 16), make([]byte, 17))
	f.Fuzz(func(t *testing.T, key, msg, tag []byte) {
		c, err := New(key)
		if err != nil {
			return
		}
		_ = c.Verify(msg, tag)
		var good [Size]byte
		c.Sum(&good, msg)
		if err := c.Verify(msg, good[:]); err != nil {
			t.Fatalf("own tag refused: %v", err)
		}
		good[len(msg)%Size] ^= 0x10
		if err := c.Verify(msg, good[:]); !errors.Is(err, ErrMismatch) {
			t.Fatalf("flipped tag: %v, want ErrMismatch", err)
		}
	})
}
