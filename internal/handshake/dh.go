package handshake

import (
	"crypto/ecdh"
	"errors"
	"io"
	"sync"

	"github.com/flynn/noise"
)

// x25519 is Noise's "25519" DH function on crypto/ecdh, keeping each
// private key's parsed form. golang.org/x/crypto's X25519 (what flynn/noise
// uses) parses the private key for every DH, and crypto/ecdh computes the
// public key when it parses: a second scalar multiplication per DH. Here a
// key is parsed once (the static key for the process's life, an ephemeral
// key for the few DHs of its handshake), so each DH is one multiplication.
// The bytes on the wire are Noise's own: only the work is less.
type x25519 struct {
	mu   sync.Mutex
	keys map[[32]byte]*ecdh.PrivateKey
}

// maxParsedKeys bounds the cache; ephemeral keys live one handshake, so
// dropping the oldest half when it is full costs at most a re-parse.
const maxParsedKeys = 4096

var dh25519 = &x25519{keys: map[[32]byte]*ecdh.PrivateKey{}}

var errDHKey = errors.New("handshake: bad X25519 key")

func (x *x25519) parsed(priv []byte) (*ecdh.PrivateKey, error) {
	if len(priv) != 32 {
		return nil, errDHKey
	}
	k := [32]byte(priv)
	x.mu.Lock()
	p := x.keys[k]
	x.mu.Unlock()
	if p != nil {
		return p, nil
	}
	p, err := ecdh.X25519().NewPrivateKey(priv)
	if err != nil {
		return nil, err
	}
	x.remember(k, p)
	return p, nil
}

func (x *x25519) remember(k [32]byte, p *ecdh.PrivateKey) {
	x.mu.Lock()
	defer x.mu.Unlock()
	if len(x.keys) >= maxParsedKeys {
		n := 0
		for old := range x.keys { // map order is random: a random half goes
			if n >= maxParsedKeys/2 {
				break
			}
			delete(x.keys, old)
			n++
		}
	}
	x.keys[k] = p
}

// sameEphemeral, given as the handshake's source of randomness, makes
// GenerateKeypair return this private key again: an initiator remakes its
// state after a forged Response with the ephemeral key it sent (crypto/ecdh
// takes no random source of ours since Go 1.26).
type sameEphemeral []byte

func (sameEphemeral) Read([]byte) (int, error) {
	return 0, errors.New("handshake: sameEphemeral is not a random source")
}

// GenerateKeypair implements noise.DHFunc.
func (x *x25519) GenerateKeypair(random io.Reader) (noise.DHKey, error) {
	var p *ecdh.PrivateKey
	var err error
	if same, ok := random.(sameEphemeral); ok {
		p, err = ecdh.X25519().NewPrivateKey(same)
	} else {
		p, err = ecdh.X25519().GenerateKey(random)
	}
	if err != nil {
		return noise.DHKey{}, err
	}
	priv := p.Bytes()
	x.remember([32]byte(priv), p)
	return noise.DHKey{Private: priv, Public: p.PublicKey().Bytes()}, nil
}

// DH implements noise.DHFunc.
func (x *x25519) DH(priv, pub []byte) ([]byte, error) {
	p, err := x.parsed(priv)
	if err != nil {
		return nil, err
	}
	q, err := ecdh.X25519().NewPublicKey(pub)
	if err != nil {
		return nil, err
	}
	return p.ECDH(q)
}

// DHLen implements noise.DHFunc.
func (x *x25519) DHLen() int { return 32 }

// DHName implements noise.DHFunc: "25519", so the protocol name (and every
// hash of the handshake) is Noise_IX_25519_AESGCM_SHA256's.
func (x *x25519) DHName() string { return "25519" }
