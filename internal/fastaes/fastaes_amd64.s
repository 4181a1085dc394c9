// Derived from the Go standard library's crypto/internal/fips140/aes/aes_amd64.s
// (generated there by _asm/standard/asm_amd64.go). Changed for Enclave: the
// decryption key schedule and decryptBlockAsm are removed; encryptBlockAsm
// became encryptXor3Asm (its input is the XOR of three blocks), and
// encryptXor3x2Asm and expandKey256Asm are added.
//
// Copyright 2012 The Go Authors. All rights reserved.
// Use of this source code is governed by a BSD-style
// license that can be found in the LICENSE-GO file in this directory.

//go:build !purego

#include "textflag.h"

// func encryptXor3Asm(nr int, xk *uint32, dst, a, b, c *byte)
// dst = E(a ^ b ^ c), the XOR done in registers (Enclave addition).
// Requires: AES, SSE, SSE2
TEXT ·encryptXor3Asm(SB), NOSPLIT, $0-48
	MOVQ   nr+0(FP), CX
	MOVQ   xk+8(FP), AX
	MOVQ   dst+16(FP), DX
	MOVQ   a+24(FP), BX
	MOVQ   b+32(FP), SI
	MOVQ   c+40(FP), DI
	MOVUPS (AX), X1
	MOVUPS (BX), X0
	MOVUPS (SI), X2
	PXOR   X2, X0
	MOVUPS (DI), X2
	PXOR   X2, X0
	ADDQ   $0x10, AX
	PXOR   X1, X0
	SUBQ   $0x0c, CX
	JE     Lenc192
	JB     Lenc128
	MOVUPS (AX), X1
	AESENC X1, X0
	MOVUPS 16(AX), X1
	AESENC X1, X0
	ADDQ   $0x20, AX

Lenc192:
	MOVUPS (AX), X1
	AESENC X1, X0
	MOVUPS 16(AX), X1
	AESENC X1, X0
	ADDQ   $0x20, AX

Lenc128:
	MOVUPS     (AX), X1
	AESENC     X1, X0
	MOVUPS     16(AX), X1
	AESENC     X1, X0
	MOVUPS     32(AX), X1
	AESENC     X1, X0
	MOVUPS     48(AX), X1
	AESENC     X1, X0
	MOVUPS     64(AX), X1
	AESENC     X1, X0
	MOVUPS     80(AX), X1
	AESENC     X1, X0
	MOVUPS     96(AX), X1
	AESENC     X1, X0
	MOVUPS     112(AX), X1
	AESENC     X1, X0
	MOVUPS     128(AX), X1
	AESENC     X1, X0
	MOVUPS     144(AX), X1
	AESENCLAST X1, X0
	MOVUPS     X0, (DX)
	RET

// func encryptXor3x2Asm(nr int, xk *uint32, dst1, a1, b1, c1, dst2, a2, b2, c2 *byte)
// dst1 = E(a1 ^ b1 ^ c1) and dst2 = E(a2 ^ b2 ^ c2), the two blocks
// interleaved round by round so that they share the AES unit's pipeline
// (Enclave addition).
// Requires: AES, SSE, SSE2
TEXT ·encryptXor3x2Asm(SB), NOSPLIT, $0-80
	MOVQ   nr+0(FP), CX
	MOVQ   xk+8(FP), AX
	MOVQ   dst1+16(FP), DX
	MOVQ   a1+24(FP), BX
	MOVQ   b1+32(FP), SI
	MOVQ   c1+40(FP), DI
	MOVUPS (BX), X0
	MOVUPS (SI), X2
	PXOR   X2, X0
	MOVUPS (DI), X2
	PXOR   X2, X0
	MOVQ   dst2+48(FP), R8
	MOVQ   a2+56(FP), BX
	MOVQ   b2+64(FP), SI
	MOVQ   c2+72(FP), DI
	MOVUPS (BX), X4
	MOVUPS (SI), X2
	PXOR   X2, X4
	MOVUPS (DI), X2
	PXOR   X2, X4
	MOVUPS (AX), X1
	ADDQ   $0x10, AX
	PXOR   X1, X0
	PXOR   X1, X4
	SUBQ   $0x0c, CX
	JE     Lenc192
	JB     Lenc128
	MOVUPS (AX), X1
	AESENC X1, X0
	AESENC X1, X4
	MOVUPS 16(AX), X1
	AESENC X1, X0
	AESENC X1, X4
	ADDQ   $0x20, AX

Lenc192:
	MOVUPS (AX), X1
	AESENC X1, X0
	AESENC X1, X4
	MOVUPS 16(AX), X1
	AESENC X1, X0
	AESENC X1, X4
	ADDQ   $0x20, AX

Lenc128:
	MOVUPS     (AX), X1
	AESENC     X1, X0
	AESENC     X1, X4
	MOVUPS     16(AX), X1
	AESENC     X1, X0
	AESENC     X1, X4
	MOVUPS     32(AX), X1
	AESENC     X1, X0
	AESENC     X1, X4
	MOVUPS     48(AX), X1
	AESENC     X1, X0
	AESENC     X1, X4
	MOVUPS     64(AX), X1
	AESENC     X1, X0
	AESENC     X1, X4
	MOVUPS     80(AX), X1
	AESENC     X1, X0
	AESENC     X1, X4
	MOVUPS     96(AX), X1
	AESENC     X1, X0
	AESENC     X1, X4
	MOVUPS     112(AX), X1
	AESENC     X1, X0
	AESENC     X1, X4
	MOVUPS     128(AX), X1
	AESENC     X1, X0
	AESENC     X1, X4
	MOVUPS     144(AX), X1
	AESENCLAST X1, X0
	AESENCLAST X1, X4
	MOVUPS     X0, (DX)
	MOVUPS     X4, (R8)
	RET


// func expandKeyAsm(nr int, key *byte, enc *uint32)
// Requires: AES, SSE, SSE2
TEXT ·expandKeyAsm(SB), NOSPLIT, $0-24
	MOVQ   nr+0(FP), CX
	MOVQ   key+8(FP), AX
	MOVQ   enc+16(FP), BX
	MOVUPS (AX), X0

	// enc
	MOVUPS          X0, (BX)
	ADDQ            $0x10, BX
	PXOR            X4, X4
	CMPL            CX, $0x0c
	JE              Lexp_enc192
	JB              Lexp_enc128
	MOVUPS          16(AX), X2
	MOVUPS          X2, (BX)
	ADDQ            $0x10, BX
	AESKEYGENASSIST $0x01, X2, X1
	CALL            _expand_key_256a<>(SB)
	AESKEYGENASSIST $0x01, X0, X1
	CALL            _expand_key_256b<>(SB)
	AESKEYGENASSIST $0x02, X2, X1
	CALL            _expand_key_256a<>(SB)
	AESKEYGENASSIST $0x02, X0, X1
	CALL            _expand_key_256b<>(SB)
	AESKEYGENASSIST $0x04, X2, X1
	CALL            _expand_key_256a<>(SB)
	AESKEYGENASSIST $0x04, X0, X1
	CALL            _expand_key_256b<>(SB)
	AESKEYGENASSIST $0x08, X2, X1
	CALL            _expand_key_256a<>(SB)
	AESKEYGENASSIST $0x08, X0, X1
	CALL            _expand_key_256b<>(SB)
	AESKEYGENASSIST $0x10, X2, X1
	CALL            _expand_key_256a<>(SB)
	AESKEYGENASSIST $0x10, X0, X1
	CALL            _expand_key_256b<>(SB)
	AESKEYGENASSIST $0x20, X2, X1
	CALL            _expand_key_256a<>(SB)
	AESKEYGENASSIST $0x20, X0, X1
	CALL            _expand_key_256b<>(SB)
	AESKEYGENASSIST $0x40, X2, X1
	CALL            _expand_key_256a<>(SB)
	JMP             Lexp_dec

Lexp_enc192:
	MOVQ            16(AX), X2
	AESKEYGENASSIST $0x01, X2, X1
	CALL            _expand_key_192a<>(SB)
	AESKEYGENASSIST $0x02, X2, X1
	CALL            _expand_key_192b<>(SB)
	AESKEYGENASSIST $0x04, X2, X1
	CALL            _expand_key_192a<>(SB)
	AESKEYGENASSIST $0x08, X2, X1
	CALL            _expand_key_192b<>(SB)
	AESKEYGENASSIST $0x10, X2, X1
	CALL            _expand_key_192a<>(SB)
	AESKEYGENASSIST $0x20, X2, X1
	CALL            _expand_key_192b<>(SB)
	AESKEYGENASSIST $0x40, X2, X1
	CALL            _expand_key_192a<>(SB)
	AESKEYGENASSIST $0x80, X2, X1
	CALL            _expand_key_192b<>(SB)
	JMP             Lexp_dec

Lexp_enc128:
	AESKEYGENASSIST $0x01, X0, X1
	CALL            _expand_key_128<>(SB)
	AESKEYGENASSIST $0x02, X0, X1
	CALL            _expand_key_128<>(SB)
	AESKEYGENASSIST $0x04, X0, X1
	CALL            _expand_key_128<>(SB)
	AESKEYGENASSIST $0x08, X0, X1
	CALL            _expand_key_128<>(SB)
	AESKEYGENASSIST $0x10, X0, X1
	CALL            _expand_key_128<>(SB)
	AESKEYGENASSIST $0x20, X0, X1
	CALL            _expand_key_128<>(SB)
	AESKEYGENASSIST $0x40, X0, X1
	CALL            _expand_key_128<>(SB)
	AESKEYGENASSIST $0x80, X0, X1
	CALL            _expand_key_128<>(SB)
	AESKEYGENASSIST $0x1b, X0, X1
	CALL            _expand_key_128<>(SB)
	AESKEYGENASSIST $0x36, X0, X1
	CALL            _expand_key_128<>(SB)

Lexp_dec:
	// Only the encryption schedule is needed (CMAC, CTR and GCM
	// never decrypt a block), so the inverse schedule is not computed.
	RET

// func _expand_key_128<>()
// Requires: SSE, SSE2
TEXT _expand_key_128<>(SB), NOSPLIT, $0
	PSHUFD $0xff, X1, X1
	SHUFPS $0x10, X0, X4
	PXOR   X4, X0
	SHUFPS $0x8c, X0, X4
	PXOR   X4, X0
	PXOR   X1, X0
	MOVUPS X0, (BX)
	ADDQ   $0x10, BX
	RET

// func _expand_key_192a<>()
// Requires: SSE, SSE2
TEXT _expand_key_192a<>(SB), NOSPLIT, $0
	PSHUFD $0x55, X1, X1
	SHUFPS $0x10, X0, X4
	PXOR   X4, X0
	SHUFPS $0x8c, X0, X4
	PXOR   X4, X0
	PXOR   X1, X0
	MOVAPS X2, X5
	MOVAPS X2, X6
	PSLLDQ $0x04, X5
	PSHUFD $0xff, X0, X3
	PXOR   X3, X2
	PXOR   X5, X2
	MOVAPS X0, X1
	SHUFPS $0x44, X0, X6
	MOVUPS X6, (BX)
	SHUFPS $0x4e, X2, X1
	MOVUPS X1, 16(BX)
	ADDQ   $0x20, BX
	RET

// func _expand_key_192b<>()
// Requires: SSE, SSE2
TEXT _expand_key_192b<>(SB), NOSPLIT, $0
	PSHUFD $0x55, X1, X1
	SHUFPS $0x10, X0, X4
	PXOR   X4, X0
	SHUFPS $0x8c, X0, X4
	PXOR   X4, X0
	PXOR   X1, X0
	MOVAPS X2, X5
	PSLLDQ $0x04, X5
	PSHUFD $0xff, X0, X3
	PXOR   X3, X2
	PXOR   X5, X2
	MOVUPS X0, (BX)
	ADDQ   $0x10, BX
	RET

// func _expand_key_256a<>()
TEXT _expand_key_256a<>(SB), NOSPLIT, $0
	JMP _expand_key_128<>(SB)

// func _expand_key_256b<>()
// Requires: SSE, SSE2
TEXT _expand_key_256b<>(SB), NOSPLIT, $0
	PSHUFD $0xaa, X1, X1
	SHUFPS $0x10, X2, X4
	PXOR   X4, X2
	SHUFPS $0x8c, X2, X4
	PXOR   X4, X2
	PXOR   X1, X2
	MOVUPS X2, (BX)
	ADDQ   $0x10, BX
	RET

// AES-256 key expansion without AESKEYGENASSIST (an Enclave addition; the
// standard library's expandKeyAsm above remains in use for 128 and 192-bit
// keys). AESKEYGENASSIST has a long latency on many x86 cores; AESENCLAST on
// a state whose four columns are equal computes SubWord on every column
// (ShiftRows then has nothing to move) and adds the round constant, which is
// all a key-schedule step needs. Each step computes
//
//	rk[2r]   = prefixXor(rk[2r-2]) ^ bcast(SubWord(RotWord(rk[2r-1].w3)) ^ rcon)
//	rk[2r+1] = prefixXor(rk[2r-1]) ^ bcast(SubWord(rk[2r].w3))
//
// where prefixXor(x) = x ^ x<<32 ^ x<<64 ^ x<<96 gives w0, w0^w1, ... as
// FIPS 197's recurrence does. The same technique is in OpenSSL's
// aesni-x86_64 ("_alt" key set-up).

// rotWordMask, per 32-bit lane: bytes 13,14,15,12 = RotWord of word 3,
// broadcast into every lane.
DATA rotWordMask<>+0(SB)/4, $0x0c0f0e0d
DATA rotWordMask<>+4(SB)/4, $0x0c0f0e0d
DATA rotWordMask<>+8(SB)/4, $0x0c0f0e0d
DATA rotWordMask<>+12(SB)/4, $0x0c0f0e0d
GLOBL rotWordMask<>(SB), RODATA|NOPTR, $16

// rcon1 is the first round constant in every lane; it doubles each step.
DATA rcon1<>+0(SB)/4, $1
DATA rcon1<>+4(SB)/4, $1
DATA rcon1<>+8(SB)/4, $1
DATA rcon1<>+12(SB)/4, $1
GLOBL rcon1<>(SB), RODATA|NOPTR, $16

// func expandKey256Asm(key *byte, enc *uint32)
// Requires: AES, SSE2, SSSE3
TEXT ·expandKey256Asm(SB), NOSPLIT, $0-16
	MOVQ   key+0(FP), AX
	MOVQ   enc+8(FP), BX
	MOVUPS (AX), X0
	MOVUPS 16(AX), X1
	MOVUPS X0, (BX)
	MOVUPS X1, 16(BX)
	ADDQ   $0x20, BX
	MOVOU  rotWordMask<>(SB), X5
	MOVOU  rcon1<>(SB), X4
	PXOR   X6, X6
	MOVL   $7, CX

loop256:
	// Even round key, from the pair before it.
	MOVOU      X1, X2
	PSHUFB     X5, X2
	AESENCLAST X4, X2
	MOVOU      X0, X3
	PSLLDQ     $4, X0
	PXOR       X0, X3
	PSLLDQ     $4, X0
	PXOR       X0, X3
	PSLLDQ     $4, X0
	PXOR       X3, X0
	PSLLL      $1, X4
	PXOR       X2, X0
	MOVUPS     X0, (BX)
	DECL       CX
	JZ         done256

	// Odd round key.
	PSHUFD     $0xff, X0, X2
	AESENCLAST X6, X2
	MOVOU      X1, X3
	PSLLDQ     $4, X1
	PXOR       X1, X3
	PSLLDQ     $4, X1
	PXOR       X1, X3
	PSLLDQ     $4, X1
	PXOR       X3, X1
	PXOR       X2, X1
	MOVUPS     X1, 16(BX)
	ADDQ       $0x20, BX
	JMP        loop256

done256:
	RET
