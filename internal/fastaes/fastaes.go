// Package fastaes is an AES block cipher (encryption only) whose key schedule
// lives in a caller-owned value.
//
// crypto/aes allocates every cipher.Block on the heap, which costs more than
// the few block encryptions a key derivation needs. Enclave re-keys AES per
// packet (every SA key is derived from the packet's own derivation input), so
// it needs a key set-up that allocates nothing. A zero Block is ready for
// Init; Init may be called again to re-key in place.
//
// On amd64 with AES-NI the work is done in assembly: the Go standard
// library's (crypto/internal/fips140/aes) for block encryption and 128/192-bit
// key expansion, plus three additions of ours, each tested against crypto/aes
// on random keys: an AES-256 key expansion with AESENCLAST instead of the slow
// AESKEYGENASSIST (about 16 ns instead of 60), and EncryptXOR3 and
// EncryptXOR3x2, CMAC's block step done in registers, one or two blocks at a
// time. Everything is constant-time (AES-NI has no data-dependent timing).
// Elsewhere, or with the purego build tag, Block falls back to crypto/aes,
// which is constant-time but allocates in Init and Encrypt.
package fastaes

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/subtle"
	"strconv"
)

// BlockSize is the AES block size in bytes.
const BlockSize = 16

// KeySizeError is returned by Init for a key that is not 16, 24 or 32 bytes.
type KeySizeError int

func (k KeySizeError) Error() string {
	return "fastaes: invalid key size " + strconv.Itoa(int(k)) + " (want 16, 24 or 32 bytes)"
}

// Block is an AES key schedule for encryption. It is safe for concurrent
// Encrypt calls once Init has returned.
type Block struct {
	rounds int
	// enc holds the round keys; (rounds+1)*4 words are used.
	enc [60]uint32
	// fallback is set only where AES-NI is not available.
	fallback cipher.Block
}

// Init expands key (16, 24 or 32 bytes: AES-128, -192 or -256) into b.
// On failure b is left unusable (Encrypt on it does nothing useful) and the
// error is a KeySizeError.
func (b *Block) Init(key []byte) error {
	switch len(key) {
	case 16:
		b.rounds = 10
	case 24:
		b.rounds = 12
	case 32:
		b.rounds = 14
	default:
		*b = Block{} // no old round keys stay behind
		return KeySizeError(len(key))
	}
	if useAsm {
		b.fallback = nil
		if b.rounds == 14 {
			expandKey256Asm(&key[0], &b.enc[0])
		} else {
			expandKeyAsm(b.rounds, &key[0], &b.enc[0])
		}
		return nil
	}
	c, err := aes.NewCipher(key)
	if err != nil {
		return err
	}
	b.fallback = c
	return nil
}

// Encrypt encrypts one block from src into dst; they may overlap exactly.
// On a Block whose Init failed or never ran, dst is zeroed.
func (b *Block) Encrypt(dst, src *[BlockSize]byte) {
	if b.rounds == 0 {
		*dst = [BlockSize]byte{}
		return
	}
	if b.fallback == nil {
		encryptXor3Asm(b.rounds, &b.enc[0], &dst[0], &src[0], &zero[0], &zero[0])
		return
	}
	b.encryptFallback(dst, src)
}

// EncryptXOR3 sets dst = E(a ^ b ^ c). CMAC's block steps are exactly this
// (chain value ^ message block ^ subkey); doing the XOR in registers avoids
// a call per XOR and store-to-load stalls. Any of the pointers may alias.
func (b *Block) EncryptXOR3(dst, x, y, z *[BlockSize]byte) {
	if b.rounds == 0 {
		*dst = [BlockSize]byte{}
		return
	}
	if b.fallback == nil {
		encryptXor3Asm(b.rounds, &b.enc[0], &dst[0], &x[0], &y[0], &z[0])
		return
	}
	var t [BlockSize]byte
	subtle.XORBytes(t[:], x[:], y[:])
	subtle.XORBytes(t[:], t[:], z[:])
	b.encryptFallback(dst, &t)
}

// EncryptXOR3x2 is two independent EncryptXOR3 calls done together:
// dst1 = E(a1 ^ b1 ^ c1) and dst2 = E(a2 ^ b2 ^ c2). Interleaving the rounds
// of the two blocks lets them share the AES unit's pipeline, so the pair
// costs about one block's latency. All inputs are read before either output
// is written, so any pointers may alias.
func (b *Block) EncryptXOR3x2(dst1, a1, b1, c1, dst2, a2, b2, c2 *[BlockSize]byte) {
	if b.rounds == 0 {
		*dst1, *dst2 = [BlockSize]byte{}, [BlockSize]byte{}
		return
	}
	if b.fallback == nil {
		encryptXor3x2Asm(b.rounds, &b.enc[0], &dst1[0], &a1[0], &b1[0], &c1[0], &dst2[0], &a2[0], &b2[0], &c2[0])
		return
	}
	var t1, t2 [BlockSize]byte
	subtle.XORBytes(t1[:], a1[:], b1[:])
	subtle.XORBytes(t1[:], t1[:], c1[:])
	subtle.XORBytes(t2[:], a2[:], b2[:])
	subtle.XORBytes(t2[:], t2[:], c2[:])
	b.encryptFallback(dst1, &t1)
	b.encryptFallback(dst2, &t2)
}

// zero is the all-zero block: XOR operands that change nothing.
var zero [BlockSize]byte

// encryptFallback is separate so that only this path's scratch buffer
// escapes to the heap (through the interface call), not the caller's.
func (b *Block) encryptFallback(dst, src *[BlockSize]byte) {
	buf := new([BlockSize]byte)
	*buf = *src
	b.fallback.Encrypt(buf[:], buf[:])
	*dst = *buf
}

// Accelerated reports whether this machine uses the AES-NI assembly (no
// allocation anywhere) rather than the crypto/aes fallback.
func Accelerated() bool {
	return useAsm
}

// Ready reports whether Init has succeeded on b.
func (b *Block) Ready() bool {
	return b.rounds != 0
}

// Reset zeroes the key schedule, so that no round key stays in memory.
func (b *Block) Reset() {
	*b = Block{}
}
