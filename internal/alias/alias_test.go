package alias

import "testing"

func TestOverlap(t *testing.T) {
	b := make([]byte, 32)
	tests := []struct {
		name           string
		x, y           []byte
		any, inexactly bool
	}{
		{"same start", b[:8], b[:16], true, false},
		{"shifted", b[1:9], b[:16], true, true},
		{"adjacent", b[:8], b[8:16], false, false},
		{"last byte", b[:9], b[8:16], true, true},
		{"empty", b[:0], b, false, false},
		{"separate", b[:8], make([]byte, 8), false, false},
	}
	for _, tt := range tests {
		if got := AnyOverlap(tt.x, tt.y); got != tt.any {
			t.Errorf("%s: AnyOverlap = %v", tt.name, got)
		}
		if got := InexactOverlap(tt.x, tt.y); got != tt.inexactly {
			t.Errorf("%s: InexactOverlap = %v", tt.name, got)
		}
	}
}
