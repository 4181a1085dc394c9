package keys

import "errors"

// Errors returned by this package. Callers test them with errors.Is; the
// derivation hot path returns them unwrapped so that a refusal costs no
// allocation.
var (
	// ErrKeyLength: a key is not 32 bytes (64 hex digits).
	ErrKeyLength = errors.New("keys: a key must be 32 bytes (64 hex digits)")
	// ErrEnclaveZero: enclave id 0 is reserved.
	ErrEnclaveZero = errors.New("keys: enclave id 0 is reserved")
	// ErrSPIIndexZero: the low 31 bits of an SPI must not be zero.
	ErrSPIIndexZero = errors.New("keys: SPI index (low 31 bits) 0 is invalid")
	// ErrParity: bit 31 of the SPI is not the generation's parity.
	ErrParity = errors.New("keys: SPI parity bit does not match the generation")
	// ErrVersion: the PSP version is neither 0 nor 1.
	ErrVersion = errors.New("keys: PSP version must be 0 (AES-128-GCM) or 1 (AES-256-GCM)")
	// ErrScope: the derivation info names a pair or server other than the
	// one this key belongs to.
	ErrScope = errors.New("keys: derivation info is outside this key's scope")
	// ErrLevel: the key's level cannot produce what was asked, or the
	// level itself is unknown.
	ErrLevel = errors.New("keys: wrong key level for this derivation")
	// ErrNoGeneration: the org level needs a generation, which is one of its
	// derivation inputs.
	ErrNoGeneration = errors.New("keys: a generation is required at the org level")
	// ErrNoKey: the Deriver was never successfully initialised.
	ErrNoKey = errors.New("keys: deriver has no key")
	// ErrSyntax: a textual id, SPI or key is malformed.
	ErrSyntax = errors.New("keys: malformed input")
	// ErrSecret: a secret was about to be encoded implicitly (JSON, text);
	// call Hex to reveal it on purpose.
	ErrSecret = errors.New("keys: refusing to encode key material implicitly; use Hex")
)
