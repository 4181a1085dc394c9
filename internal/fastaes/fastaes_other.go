//go:build !amd64 || purego

package fastaes

// useAsm is false: this platform uses crypto/aes.
const useAsm = false

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
