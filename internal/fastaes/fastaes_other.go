//go:build !amd64 || purego

package fastaes

// useAsm is false: this platform uses crypto/aes.
const useAsm = false

// hasPCLMULQDQ is irrelevant without assembly.
const hasPCLMULQDQ = false

func expandKeyAsm(nr int, key *byte, enc *uint32) {
	panic("fastaes: unreachable: no assembly on this platform")
}

func encryptXor3Asm(nr int, xk *uint32, dst, a, b, c *byte) {
	panic("fastaes: unreachable: no assembly on this platform")
}

func expandKey256Asm(key *byte, enc *uint32) {
	panic("fastaes: unreachable: no assembly on this platform")
}

func encryptXor3x2Asm(nr int, xk *uint32, dst1, a1, b1, c1, dst2, a2, b2, c2 *byte) {
	panic("fastaes: unreachable: no assembly on this platform")
}

func gcmAesInit(productTable *[256]byte, ks []uint32) {
	panic("fastaes: unreachable: no assembly on this platform")
}

func gcmAesData(productTable *[256]byte, data []byte, T *[16]byte) {
	panic("fastaes: unreachable: no assembly on this platform")
}

func gcmAesEnc(productTable *[256]byte, dst, src []byte, ctr, T *[16]byte, ks []uint32) {
	panic("fastaes: unreachable: no assembly on this platform")
}

func gcmAesDec(productTable *[256]byte, dst, src []byte, ctr, T *[16]byte, ks []uint32) {
	panic("fastaes: unreachable: no assembly on this platform")
}

func gcmAesFinish(productTable *[256]byte, tagMask, T *[16]byte, pLen, dLen uint64) {
	panic("fastaes: unreachable: no assembly on this platform")
}
