package keys

import (
	"crypto/subtle"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"strings"
)

// KeySize is the length of every hierarchy key: OK, EK and SK are 256 bits.
const KeySize = 32

// redacted is what a key prints as.
const redacted = "[redacted]"

// Key is a 256-bit key of the hierarchy (OK, EK, SK, or an enclave key E_i).
// It never prints or encodes its bytes by accident: fmt, slog, JSON and text
// encodings show "[redacted]" or fail; Hex reveals it on purpose.
type Key [KeySize]byte

// KeyFromBytes copies a 32-byte key.
func KeyFromBytes(b []byte) (Key, error) {
	var k Key
	if len(b) != KeySize {
		return k, fmt.Errorf("%w: got %d bytes", ErrKeyLength, len(b))
	}
	copy(k[:], b)
	return k, nil
}

// ParseKey parses 64 hex digits (either case; surrounding white space, such
// as a key file's final newline, is ignored).
func ParseKey(text string) (Key, error) {
	var k Key
	text = strings.TrimSpace(text)
	for i := 0; i < len(text); i++ {
		if c := text[i]; !('0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F') {
			return k, fmt.Errorf("%w: a key is 64 hex digits (0-9, a-f); this has %q at position %d", ErrSyntax, rune(c), i+1)
		}
	}
	if len(text) != 2*KeySize {
		return k, fmt.Errorf("%w: got %d hex digits", ErrKeyLength, len(text))
	}
	if _, err := hex.Decode(k[:], []byte(text)); err != nil {
		k = Key{}
		return k, fmt.Errorf("%w: key is not hex", ErrSyntax)
	}
	return k, nil
}

// Hex returns the key as 64 lowercase hex digits. It is the only way this
// package reveals key bytes as text; call it only where the user asked for
// secrets.
func (k *Key) Hex() string { return hex.EncodeToString(k[:]) }

// Equal compares two keys in constant time.
func (k *Key) Equal(o *Key) bool { return subtle.ConstantTimeCompare(k[:], o[:]) == 1 }

// Zero overwrites the key.
func (k *Key) Zero() { clear(k[:]) }

// Format prints "[redacted]" for every verb, so %v, %x and %s never leak.
func (k Key) Format(f fmt.State, _ rune) { _, _ = io.WriteString(f, redacted) }

// String returns "[redacted]".
func (k Key) String() string { return redacted }

// LogValue keeps key bytes out of structured logs.
func (k Key) LogValue() slog.Value { return slog.StringValue(redacted) }

// MarshalText refuses, so that JSON, YAML or text encodings never carry the
// key implicitly.
func (k Key) MarshalText() ([]byte, error) { return nil, ErrSecret }

// SAKey is the key of one SA direction: 16 bytes for PSPv0 (AES-128-GCM)
// or 32 for PSPv1 (AES-256-GCM). It redacts itself like Key.
type SAKey struct {
	b [32]byte
	v Version
}

// Version is the PSP version the key is for.
func (k *SAKey) Version() Version { return k.v }

// Bytes returns the key, aliasing k's storage (no copy, no allocation).
func (k *SAKey) Bytes() []byte { return k.b[:k.v.KeySize()] }

// Hex returns the key as lowercase hex; see Key.Hex.
func (k *SAKey) Hex() string { return hex.EncodeToString(k.Bytes()) }

// Equal compares two SA keys, version included, in constant time.
func (k *SAKey) Equal(o *SAKey) bool {
	return subtle.ConstantTimeCompare(k.b[:], o.b[:])&subtle.ConstantTimeByteEq(byte(k.v), byte(o.v)) == 1
}

// Zero overwrites the key.
func (k *SAKey) Zero() { *k = SAKey{} }

// Format prints "[redacted]" for every verb.
func (k SAKey) Format(f fmt.State, _ rune) { _, _ = io.WriteString(f, redacted) }

// String returns "[redacted]".
func (k SAKey) String() string { return redacted }

// LogValue keeps key bytes out of structured logs.
func (k SAKey) LogValue() slog.Value { return slog.StringValue(redacted) }

// MarshalText refuses; see Key.MarshalText.
func (k SAKey) MarshalText() ([]byte, error) { return nil, ErrSecret }
