//go:build !purego

package fastaes

import "golang.org/x/sys/cpu"

// useAsm mirrors crypto/aes's own check for its AES-NI path.
var useAsm = cpu.X86.HasAES && cpu.X86.HasSSE41 && cpu.X86.HasSSSE3

//go:noescape
func expandKeyAsm(nr int, key *byte, enc *uint32)

//go:noescape
func encryptXor3Asm(nr int, xk *uint32, dst, a, b, c *byte)

//go:noescape
func expandKey256Asm(key *byte, enc *uint32)

//go:noescape
func encryptXor3x2Asm(nr int, xk *uint32, dst1, a1, b1, c1, dst2, a2, b2, c2 *byte)
