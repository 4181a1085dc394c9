package echo

import (
	"strings"
	"testing"
	"unicode/utf8"
)

func TestCut(t *testing.T) {
	tests := []struct {
		in, want string
	}{
		{"", ""},
		{"web1", "web1"},
		{strings.Repeat("a", MaxRunes), strings.Repeat("a", MaxRunes)},
		{strings.Repeat("a", MaxRunes+1), strings.Repeat("a", MaxRunes) + "…(65 bytes)"},
		{strings.Repeat("é", 5000), strings.Repeat("é", MaxRunes) + "…(10000 bytes)"},
	}
	for _, tt := range tests {
		if got := Cut(tt.in); got != tt.want {
			t.Errorf("Cut(%d bytes) = %q, want %q", len(tt.in), got, tt.want)
		}
	}
}

func TestStrings(t *testing.T) {
	in := make([]string, 100)
	for i := range in {
		in[i] = strings.Repeat("x", 100)
	}
	out := Strings(in)
	if len(out) != MaxRunes+1 || out[MaxRunes] != "…(100 arguments)" || out[0] != strings.Repeat("x", MaxRunes)+"…(100 bytes)" {
		t.Fatalf("Strings: %d elements, last %q", len(out), out[len(out)-1])
	}
	if got := Strings([]string{"a", "b"}); len(got) != 2 || got[1] != "b" {
		t.Fatalf("short list changed: %q", got)
	}
}

// FuzzCut: the result is valid UTF-8 when the input is, never longer than
// the input plus the marker, and a prefix of the input.
func FuzzCut(f *testing.F) {
	f.Add("web1")
	f.Add(strings.Repeat("ü", 70))
	f.Fuzz(func(t *testing.T, s string) {
		got := Cut(s)
		if utf8.ValidString(s) && !utf8.ValidString(got) {
			t.Fatalf("Cut broke UTF-8: %q", got)
		}
		kept, _, cut := strings.Cut(got, "…(")
		if !cut {
			kept = got
		}
		if !strings.HasPrefix(s, kept) || len(got) > len(s)+32 {
			t.Fatalf("Cut(%q) = %q", s, got)
		}
	})
}

func TestWords(t *testing.T) {
	long := strings.Repeat("b", 3000)
	tests := []struct{ in, want string }{
		{"open x: no such file", "open x: no such file"},
		{"unknown flag: --" + long + " here", "unknown flag: " + Cut("--"+long) + " here"},
		{long, Cut(long)},
		{strings.Repeat("word ", 100), strings.Repeat("word ", 100)},
	}
	for _, tt := range tests {
		if got := Words(tt.in); got != tt.want {
			t.Errorf("Words(%.40q…) = %.80q…", tt.in, got)
		}
	}
}

func TestRedact(t *testing.T) {
	key := "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
	tests := []struct{ in, want string }{
		{"takes no arguments, got [" + key + "]", "takes no arguments, got [[64 hex digits, not shown]]"},
		{"unknown command \"" + key[:32] + "\"", "unknown command \"[32 hex digits, not shown]\""},
		{"SPI 80001234 and enclave 3", "SPI 80001234 and enclave 3"},
		{key[:31] + "!", key[:31] + "!"},
		{"", ""},
	}
	for _, tt := range tests {
		if got := Redact(tt.in); got != tt.want {
			t.Errorf("Redact(%q) = %q, want %q", tt.in, got, tt.want)
		}
	}
}

// FuzzRedact: no run of MinKeyHex hex digits survives.
func FuzzRedact(f *testing.F) {
	f.Add("key 000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f")
	f.Fuzz(func(t *testing.T, s string) {
		out := Redact(s)
		run := 0
		for i := 0; i < len(out); i++ {
			if isHex(out[i]) {
				if run++; run >= MinKeyHex {
					t.Fatalf("Redact(%q) = %q keeps a long hex run", s, out)
				}
			} else {
				run = 0
			}
		}
	})
}
