// Package echo bounds the user input that error messages and logs repeat:
// a mistyped flag should be recognisable in the message, but a 5,000-byte
// argument should not fill the terminal or a log line.
package echo

import (
	"strconv"
	"strings"
	"unicode/utf8"
)

// MaxRunes is how many characters of an input Cut keeps.
const MaxRunes = 64

// Cut returns s unchanged when it has at most MaxRunes characters, and
// otherwise its first MaxRunes characters, an ellipsis and the input's full
// length in bytes, so the reader knows it was cut.
func Cut(s string) string {
	if utf8.RuneCountInString(s) <= MaxRunes {
		return s
	}
	end, n := 0, 0
	for i := range s {
		if n == MaxRunes {
			end = i
			break
		}
		n++
	}
	return s[:end] + "…(" + strconv.Itoa(len(s)) + " bytes)"
}

// Strings applies Cut to each element and keeps at most MaxRunes of them,
// for echoing an argument list.
func Strings(ss []string) []string {
	out := make([]string, 0, min(len(ss), MaxRunes))
	for i, s := range ss {
		if i == MaxRunes {
			out = append(out, "…("+strconv.Itoa(len(ss))+" arguments)")
			break
		}
		out = append(out, Cut(s))
	}
	return out
}

// MaxWord is the longest run of non-space characters Words leaves whole.
const MaxWord = 256

// Words cuts, with Cut, every run of non-space characters in a finished
// message that is longer than MaxWord bytes. It is the last guard for
// messages that repeat input this project does not format itself (a
// library's "unknown flag", a file name in an OS error); the words of an
// ordinary message are far shorter and pass unchanged.
func Words(msg string) string {
	if len(msg) <= MaxWord {
		return msg
	}
	var b strings.Builder
	for len(msg) > 0 {
		i := strings.IndexAny(msg, " \t\n")
		if i < 0 {
			i = len(msg)
		}
		if w := msg[:i]; len(w) > MaxWord {
			b.WriteString(Cut(w))
		} else {
			b.WriteString(w)
		}
		if i < len(msg) {
			b.WriteByte(msg[i])
			i++
		}
		msg = msg[i:]
	}
	return b.String()
}

// MinKeyHex is the shortest run of hex digits Redact hides: a 128-bit key.
const MinKeyHex = 32

// Redact replaces every run of MinKeyHex or more hex digits in a finished
// message with a placeholder giving its length: such a run could be a key
// typed in the wrong place, and a message must never repeat one. It is
// applied to every error the command line prints, whoever wrote it.
func Redact(msg string) string {
	var b strings.Builder
	run := 0
	flush := func(i int) {
		if run >= MinKeyHex {
			b.WriteString("[" + strconv.Itoa(run) + " hex digits, not shown]")
		} else {
			b.WriteString(msg[i-run : i])
		}
		run = 0
	}
	for i := 0; i < len(msg); i++ {
		if isHex(msg[i]) {
			run++
			continue
		}
		flush(i)
		b.WriteByte(msg[i])
	}
	flush(len(msg))
	return b.String()
}

func isHex(c byte) bool {
	return '0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F'
}
