// Package store persists the key service's state: the registry and the
// sealed secrets (the org key, enclave keys). Secrets are sealed with
// AES-256-GCM under a key-encryption key (KEK) that is never in the store,
// so the store file alone reveals no key.
package store

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"

	"github.com/enclavekeys/enclave/internal/fileread"
	"github.com/enclavekeys/enclave/internal/keys"
)

// KEKEnv is the environment variable a KEK may come from.
const KEKEnv = "ENCLAVE_KEK"

// Errors of sealing.
var (
	ErrNoKEK    = errors.New("store: no key-encryption key: give --kek-file or set " + KEKEnv)
	ErrKEK      = errors.New("store: key-encryption key must be 64 hex digits (32 bytes)")
	ErrWrongKEK = errors.New("store: the key-encryption key does not open the sealed secrets (wrong KEK, or the store was tampered with)")
	ErrSealed   = errors.New("store: sealed secret is malformed")
)

// KEK is a key-encryption key.
type KEK struct {
	key keys.Key
	// macKeys are the MAC keys derived for each purpose (integrity.go),
	// derived once: every record and audit entry read at a start uses one.
	macKeys sync.Map // purpose -> []byte
}

// LoadKEK reads the KEK from file (64 hex digits), or, when file is empty,
// from the ENCLAVE_KEK environment variable. A KEK file readable by group
// or others is refused.
func LoadKEK(file string) (*KEK, error) {
	var text string
	switch {
	case file != "":
		st, err := os.Stat(file)
		if err != nil {
			return nil, fmt.Errorf("store: --kek-file: %w", err)
		}
		if st.Mode().Perm()&0o077 != 0 {
			return nil, fmt.Errorf("store: --kek-file %s is readable by others (mode %v); chmod 600 it", file, st.Mode().Perm())
		}
		b, err := fileread.Bounded(file, fileread.MaxKey)
		if err != nil {
			return nil, fmt.Errorf("store: --kek-file: %w", err)
		}
		text = string(b)
		clear(b)
	case os.Getenv(KEKEnv) != "":
		text = os.Getenv(KEKEnv)
	default:
		return nil, ErrNoKEK
	}
	k, err := keys.ParseKey(strings.TrimSpace(text))
	if err != nil {
		return nil, ErrKEK
	}
	return &KEK{key: k}, nil
}

// NewKEK wraps 32 key bytes.
func NewKEK(b []byte) (*KEK, error) {
	k, err := keys.KeyFromBytes(b)
	if err != nil {
		return nil, ErrKEK
	}
	return &KEK{key: k}, nil
}

const sealVersion = 1

// AES-GCM's standard nonce and tag sizes, as crypto/cipher.NewGCM uses them.
const (
	nonceSize = 12
	tagSize   = 16
)

// aead is AES-256-GCM under the KEK.
func (k *KEK) aead() (cipher.AEAD, error) {
	b, err := aes.NewCipher(k.key[:])
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(b)
}

// Seal encrypts secret under the KEK, bound to name (sealed bytes cannot
// be moved to another name): version || nonce || ciphertext || tag.
func (k *KEK) Seal(name string, secret []byte) ([]byte, error) {
	g, err := k.aead()
	if err != nil {
		return nil, err
	}
	out := make([]byte, 1+nonceSize, 1+nonceSize+len(secret)+g.Overhead())
	out[0] = sealVersion
	if _, err := rand.Read(out[1:]); err != nil {
		return nil, err
	}
	return g.Seal(out, out[1:1+nonceSize], secret, aad(name)), nil
}

// Open decrypts what Seal sealed under name.
func (k *KEK) Open(name string, sealed []byte) ([]byte, error) {
	if len(sealed) < 1+nonceSize+tagSize || sealed[0] != sealVersion {
		return nil, ErrSealed
	}
	g, err := k.aead()
	if err != nil {
		return nil, err
	}
	pt, err := g.Open(nil, sealed[1:1+nonceSize], sealed[1+nonceSize:], aad(name))
	if err != nil {
		return nil, ErrWrongKEK
	}
	return pt, nil
}

func aad(name string) []byte { return []byte("enclave sealed secret v1\x00" + name) }
