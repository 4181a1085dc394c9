package fastaes

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/subtle"
	"errors"

	"github.com/enclavekeys/enclave/internal/alias"
)

// GCM sizes. Enclave's packets use 12-byte nonces (SPI || IV) and 16-byte
// tags; other nonce lengths are supported as SP 800-38D defines them.
const (
	NonceSize = 12
	TagSize   = 16
)

// maxPlaintext is SP 800-38D's limit: 2^32 - 2 blocks.
const maxPlaintext = (1<<32 - 2) * BlockSize

// Errors returned by GCM.
var (
	// ErrOpen: the ciphertext, nonce or additional data is not authentic.
	ErrOpen = errors.New("fastaes: message authentication failed")
	// ErrNonce: the nonce is empty.
	ErrNonce = errors.New("fastaes: GCM nonce must not be empty")
	// ErrLength: the message is too long for GCM, or a ciphertext is
	// shorter than a tag.
	ErrLength = errors.New("fastaes: GCM message length out of range")
	// ErrOverlap: the output overlaps an input other than exactly.
	ErrOverlap = errors.New("fastaes: output buffer overlaps an input")
	// ErrNoKey: Init has not succeeded on this GCM.
	ErrNoKey = errors.New("fastaes: GCM has no key")
)

// GCM is AES-GCM (SP 800-38D) with 16-byte tags whose whole key state (the
// AES schedule and GHASH's table of powers of H) lives in the value, so that
// Init costs tens of nanoseconds and no allocation: the data plane can set
// up a fresh key for every packet. A GCM is safe for concurrent use once
// initialised. On amd64 the work is done by the Go standard library's
// AES-NI/PCLMULQDQ assembly; elsewhere by crypto/cipher, which allocates.
type GCM struct {
	block        Block
	productTable [256]byte
	fallback     cipher.Block
	ready        bool
}

// useGCMAsm mirrors crypto/aes's own check for its AES-GCM assembly.
var useGCMAsm = useAsm && hasPCLMULQDQ

// Init (re-)keys g with a 16, 24 or 32-byte AES key. The error is a
// KeySizeError.
func (g *GCM) Init(key []byte) error {
	g.ready = false
	if err := g.block.Init(key); err != nil {
		*g = GCM{}
		return err
	}
	if useGCMAsm {
		g.fallback = nil
		gcmAesInit(&g.productTable, g.block.roundKeys())
	} else {
		c, err := aes.NewCipher(key)
		if err != nil {
			*g = GCM{}
			return err
		}
		g.fallback = c
	}
	g.ready = true
	return nil
}

// Reset zeroes the key state.
func (g *GCM) Reset() { *g = GCM{} }

// Seal encrypts and authenticates plaintext and authenticates aad, appends
// the ciphertext and tag to dst and returns the result. To encrypt in place
// pass plaintext[:0] as dst; any other overlap is an error. With enough
// capacity in dst it does not allocate.
func (g *GCM) Seal(dst, nonce, plaintext, aad []byte) ([]byte, error) {
	if !g.ready {
		return nil, ErrNoKey
	}
	if len(nonce) == 0 {
		return nil, ErrNonce
	}
	if uint64(len(plaintext)) > maxPlaintext {
		return nil, ErrLength
	}
	ret, out := sliceForAppend(dst, len(plaintext)+TagSize)
	if alias.InexactOverlap(out, plaintext) || alias.AnyOverlap(out, aad) {
		return nil, ErrOverlap
	}
	if g.fallback != nil {
		// Cloned so that the interface call does not make the caller's
		// nonce and AAD escape (which would allocate on the fast path too).
		return g.fallbackAEAD(len(nonce)).Seal(dst, bytes.Clone(nonce), plaintext, bytes.Clone(aad)), nil
	}
	var counter, tagMask, tag [BlockSize]byte
	g.initCounter(&counter, &tagMask, nonce)
	gcmAesData(&g.productTable, aad, &tag)
	if len(plaintext) > 0 {
		gcmAesEnc(&g.productTable, out, plaintext, &counter, &tag, g.block.roundKeys())
	}
	gcmAesFinish(&g.productTable, &tagMask, &tag, uint64(len(plaintext)), uint64(len(aad)))
	copy(out[len(plaintext):], tag[:])
	return ret, nil
}

// Open authenticates ciphertext (which ends in the tag) with aad and, if it
// is authentic, appends the plaintext to dst and returns the result. To
// decrypt in place pass ciphertext[:0] as dst. On ErrOpen the output bytes
// are zeroed, so no unauthenticated plaintext is released. With enough
// capacity in dst it does not allocate.
func (g *GCM) Open(dst, nonce, ciphertext, aad []byte) ([]byte, error) {
	if !g.ready {
		return nil, ErrNoKey
	}
	if len(nonce) == 0 {
		return nil, ErrNonce
	}
	if len(ciphertext) < TagSize || uint64(len(ciphertext)) > maxPlaintext+TagSize {
		return nil, ErrLength
	}
	ret, out := sliceForAppend(dst, len(ciphertext)-TagSize)
	if alias.InexactOverlap(out, ciphertext) || alias.AnyOverlap(out, aad) {
		return nil, ErrOverlap
	}
	if g.fallback != nil {
		r, err := g.fallbackAEAD(len(nonce)).Open(dst, bytes.Clone(nonce), ciphertext, bytes.Clone(aad))
		if err != nil {
			clear(out)
			return nil, ErrOpen
		}
		return r, nil
	}
	tag := ciphertext[len(ciphertext)-TagSize:]
	ciphertext = ciphertext[:len(ciphertext)-TagSize]
	var counter, tagMask, expected [BlockSize]byte
	g.initCounter(&counter, &tagMask, nonce)
	gcmAesData(&g.productTable, aad, &expected)
	if len(ciphertext) > 0 {
		gcmAesDec(&g.productTable, out, ciphertext, &counter, &expected, g.block.roundKeys())
	}
	gcmAesFinish(&g.productTable, &tagMask, &expected, uint64(len(ciphertext)), uint64(len(aad)))
	if subtle.ConstantTimeCompare(expected[:], tag) != 1 {
		clear(out)
		return nil, ErrOpen
	}
	return ret, nil
}

// initCounter sets the first counter block J0 (SP 800-38D §7.1) and the tag
// mask E(K, J0).
func (g *GCM) initCounter(counter, tagMask *[BlockSize]byte, nonce []byte) {
	if len(nonce) == NonceSize {
		copy(counter[:], nonce)
		counter[BlockSize-1] = 1
	} else {
		gcmAesData(&g.productTable, nonce, counter)
		gcmAesFinish(&g.productTable, tagMask, counter, uint64(len(nonce)), 0)
	}
	g.block.Encrypt(tagMask, counter)
}

// fallbackAEAD builds crypto/cipher's GCM for this nonce length (the
// non-assembly path allocates; it exists for portability, not speed).
func (g *GCM) fallbackAEAD(nonceSize int) cipher.AEAD {
	var a cipher.AEAD
	var err error
	if nonceSize == NonceSize {
		a, err = cipher.NewGCM(g.fallback)
	} else {
		a, err = cipher.NewGCMWithNonceSize(g.fallback, nonceSize)
	}
	if err != nil {
		// Unreachable: the block is AES and the nonce size positive.
		panic("fastaes: " + err.Error())
	}
	return a
}

// KeySize is the AES key length in bytes (16, 24 or 32), or 0 without a key.
func (g *GCM) KeySize() int {
	if !g.ready {
		return 0
	}
	return (g.block.rounds - 6) * 4
}

// roundKeys is the encryption schedule in the form the GCM assembly takes.
func (b *Block) roundKeys() []uint32 {
	return b.enc[:(b.rounds+1)*4]
}

// sliceForAppend extends in by n bytes, reallocating only if it must, and
// returns the whole slice and the n-byte tail.
func sliceForAppend(in []byte, n int) (head, tail []byte) {
	if total := len(in) + n; cap(in) >= total {
		head = in[:total]
	} else {
		head = make([]byte, total)
		copy(head, in)
	}
	return head, head[len(in):]
}
