package checksum

import (
	"encoding/hex"
	"testing"
)

func TestSum(t *testing.T) {
	for _, c := range []struct {
		hex  string
		want uint16
	}{
		// RFC 1071 §3: the words 0001 f203 f4f5 f6f7 sum to ddf2.
		{"0001f203f4f5f6f7", 0xddf2},
		// An IPv4 header with its checksum field (b861) filled in sums to
		// ffff.
		{"45000073000040004011b861c0a80001c0a800c7", 0xffff},
		{"ff", 0xff00}, // an odd byte is padded with zero
		{"", 0},
	} {
		b, _ := hex.DecodeString(c.hex)
		if got := Sum(0, b); got != c.want {
			t.Errorf("Sum(%s) = %04x, want %04x", c.hex, got, c.want)
		}
	}
	a, _ := hex.DecodeString("0001f203")
	b, _ := hex.DecodeString("f4f5f6f7")
	if Sum(Sum(0, a), b) != 0xddf2 {
		t.Error("sums do not chain")
	}
}
