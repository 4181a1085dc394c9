package packet

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"encoding/json"
	"testing"

	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/testvec"
)

type wycheproofAEAD struct {
	NumberOfTests int `json:"numberOfTests"`
	TestGroups    []struct {
		KeySize int `json:"keySize"`
		IvSize  int `json:"ivSize"`
		TagSize int `json:"tagSize"`
		Tests   []struct {
			TcID    int    `json:"tcId"`
			Comment string `json:"comment"`
			Key     string `json:"key"`
			Iv      string `json:"iv"`
			Aad     string `json:"aad"`
			Msg     string `json:"msg"`
			Ct      string `json:"ct"`
			Tag     string `json:"tag"`
			Result  string `json:"result"`
		} `json:"tests"`
	} `json:"testGroups"`
}

// TestWycheproofGCM runs every case of Wycheproof's aes_gcm_test.json. The
// cases in the packet format's shape (128- or 256-bit key, 96-bit nonce,
// 128-bit tag) go through AEAD exactly as the data plane prepares it; the
// others (192-bit keys, other nonce and tag sizes) through crypto/cipher
// with their own sizes, so that the library under the data plane is held
// to the file (but for the few shapes it cannot be asked for). Valid cases seal to the expected bytes and open;
// invalid ones are refused.
func TestWycheproofGCM(t *testing.T) {
	var f wycheproofAEAD
	if err := json.Unmarshal(testvec.Read(t, "wycheproof/aes_gcm_test.json"), &f); err != nil {
		t.Fatal(err)
	}
	ran, packetShaped, skipped := 0, 0, 0
	for _, grp := range f.TestGroups {
		for _, tc := range grp.Tests {
			ran++
			key, iv, aad := testvec.Hex(t, tc.Key), testvec.Hex(t, tc.Iv), testvec.Hex(t, tc.Aad)
			msg, ct, tag := testvec.Hex(t, tc.Msg), testvec.Hex(t, tc.Ct), testvec.Hex(t, tc.Tag)
			sealed := append(bytes.Clone(ct), tag...)
			var g cipher.AEAD
			if len(iv) == 12 && len(tag) == TagLen && (len(key) == 16 || len(key) == 32) {
				packetShaped++
				v := keys.PSPv1
				if len(key) == 16 {
					v = keys.PSPv0
				}
				a, err := NewAEAD(v, key)
				if err != nil {
					t.Fatalf("tc %d: %v", tc.TcID, err)
				}
				g = a.gcm
			} else {
				if len(iv) == 0 {
					skipped++
					continue // crypto/cipher refuses an empty nonce when the GCM is made
				}
				b, err := aes.NewCipher(key)
				if err != nil {
					t.Fatalf("tc %d: %v", tc.TcID, err)
				}
				if len(tag) == TagLen {
					g, err = cipher.NewGCMWithNonceSize(b, len(iv))
				} else {
					g, err = cipher.NewGCMWithTagSize(b, len(tag))
					if len(iv) != 12 {
						skipped++
						continue // crypto/cipher pairs a short tag only with a 96-bit nonce
					}
				}
				if err != nil {
					t.Fatalf("tc %d: %v", tc.TcID, err)
				}
			}
			switch tc.Result {
			case "valid", "acceptable":
				if got := g.Seal(nil, iv, msg, aad); !bytes.Equal(got, sealed) {
					t.Errorf("tc %d (%s): sealed %x, want %x", tc.TcID, tc.Comment, got, sealed)
				}
				if pt, err := g.Open(nil, iv, sealed, aad); err != nil || !bytes.Equal(pt, msg) {
					t.Errorf("tc %d (%s): opened %x, %v; want %x", tc.TcID, tc.Comment, pt, err, msg)
				}
			case "invalid":
				if pt, err := g.Open(nil, iv, sealed, aad); err == nil {
					t.Errorf("tc %d (%s): invalid case opened to %x", tc.TcID, tc.Comment, pt)
				}
			default:
				t.Fatalf("tc %d: result %q", tc.TcID, tc.Result)
			}
		}
	}
	if ran != f.NumberOfTests {
		t.Fatalf("read %d cases, the file declares %d", ran, f.NumberOfTests)
	}
	if packetShaped < 100 {
		t.Fatalf("only %d cases in the packet format's shape", packetShaped)
	}
	t.Logf("Wycheproof AES-GCM: %d cases, %d through AEAD, %d that crypto/cipher cannot express", ran, packetShaped, skipped)
}
