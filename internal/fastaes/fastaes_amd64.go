//go:build !purego

package fastaes

import "golang.org/x/sys/cpu"

// useAsm mirrors crypto/aes's own check for its AES-NI path.
var useAsm = cpu.X86.HasAES && cpu.X86.HasSSE41 && cpu.X86.HasSSSE3

// hasPCLMULQDQ completes the check for the GCM assembly.
var hasPCLMULQDQ = cpu.X86.HasPCLMULQDQ

//go:noescape
func expandKeyAsm(nr int, key *byte, enc *uint32)

//go:noescape
func encryptXor3Asm(nr int, xk *uint32, dst, a, b, c *byte)

//go:noescape
func expandKey256Asm(key *byte, enc *uint32)

//go:noescape
func encryptXor3x2Asm(nr int, xk *uint32, dst1, a1, b1, c1, dst2, a2, b2, c2 *byte)

// The GCM assembly, from the Go standard library (gcm_amd64.s).

//go:noescape
func gcmAesInit(productTable *[256]byte, ks []uint32)

//go:noescape
func gcmAesData(productTable *[256]byte, data []byte, T *[16]byte)

//go:noescape
func gcmAesEnc(productTable *[256]byte, dst, src []byte, ctr, T *[16]byte, ks []uint32)

//go:noescape
func gcmAesDec(productTable *[256]byte, dst, src []byte, ctr, T *[16]byte, ks []uint32)

//go:noescape
func gcmAesFinish(productTable *[256]byte, tagMask, T *[16]byte, pLen, dLen uint64)
