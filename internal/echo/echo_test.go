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
