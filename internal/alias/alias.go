// Package alias tells whether byte slices share memory, for in-place
// cryptographic operations (as crypto/internal/alias does in the standard
// library, which other packages cannot import).
package alias

import "unsafe"

// AnyOverlap reports whether x and y share memory.
func AnyOverlap(x, y []byte) bool {
	return len(x) > 0 && len(y) > 0 &&
		uintptr(unsafe.Pointer(&x[0])) <= uintptr(unsafe.Pointer(&y[len(y)-1])) &&
		uintptr(unsafe.Pointer(&y[0])) <= uintptr(unsafe.Pointer(&x[len(x)-1]))
}

// InexactOverlap reports whether x and y share memory other than starting
// at the same address, which in-place operation allows.
func InexactOverlap(x, y []byte) bool {
	if len(x) == 0 || len(y) == 0 || &x[0] == &y[0] {
		return false
	}
	return AnyOverlap(x, y)
}
