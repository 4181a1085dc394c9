package gateway

import (
	"bytes"
	"encoding/binary"
	"errors"
	"math/rand/v2"
	"testing"

	"github.com/enclavekeys/enclave/internal/packet"
)

// datagram makes a PSP datagram of SA spi with IV iv and an inner part
// (ciphertext and tag) of n random bytes: what splitRun looks at.
func datagram(r *rand.Rand, spi uint32, iv uint64, n int) []byte {
	b := make([]byte, packet.HeaderLen+n)
	b[0], b[1], b[2], b[3] = packet.NextIPv4, 2, 2, 0x13
	binary.BigEndian.PutUint32(b[4:8], spi)
	binary.BigEndian.PutUint64(b[8:16], iv)
	binary.BigEndian.PutUint64(b[16:24], 0x0003000700000102) // VC
	for i := packet.HeaderLen; i < len(b); i++ {
		b[i] = byte(r.Uint32())
	}
	return b
}

// TestSplitRun: runs of every length split back into their datagrams,
// with a last short one or not; a wrong SPI or a falling IV anywhere, a
// tail shorter than any datagram and garbage are no run. (Bytes added to
// the last datagram make it a longer last datagram: the splitter cannot
// tell, and opening it fails, as for any forged datagram.)
func TestSplitRun(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	const spi = 0x80001234
	for _, size := range []int{packet.Overhead, packet.Overhead + 20, 1300, 1420} {
		for n := 1; n <= 12; n++ {
			for _, last := range []int{size, size / 2, packet.Overhead} {
				if last > size || last < packet.Overhead || (n == 1 && last != size) {
					continue
				}
				var run []byte
				var want [][]byte
				iv := uint64(100)
				for k := 0; k < n; k++ {
					iv += 1 + uint64(k%2) // rising, not always by one
					l := size
					if k == n-1 {
						l = last
					}
					d := datagram(r, spi, iv, l-packet.HeaderLen)
					want = append(want, d)
					run = append(run, d...)
				}
				got, err := splitRun(run, nil)
				if err != nil || len(got) != n {
					t.Fatalf("size %d, %d datagrams, last %d: %d back, %v", size, n, last, len(got), err)
				}
				for k := range got {
					if !bytes.Equal(got[k], want[k]) {
						t.Fatalf("size %d, %d datagrams: datagram %d differs", size, n, k)
					}
				}
			}
		}
	}
	good := func() [][]byte {
		return [][]byte{datagram(r, spi, 7, 1380), datagram(r, spi, 8, 1380), datagram(r, spi, 9, 1380), datagram(r, spi, 10, 600)}
	}
	join := func(ds [][]byte) []byte { return bytes.Join(ds, nil) }
	for name, mangle := range map[string]func([][]byte) []byte{
		"wrong SPI in the middle": func(ds [][]byte) []byte { binary.BigEndian.PutUint32(ds[2][4:8], spi+1); return join(ds) },
		"IV falls in the middle":  func(ds [][]byte) []byte { binary.BigEndian.PutUint64(ds[2][8:16], 3); return join(ds) },
		"a tail too short":        func(ds [][]byte) []byte { return append(join(ds[:3]), ds[0][:packet.Overhead-1]...) },
		"not a PSP header first":  func(ds [][]byte) []byte { ds[0][1] = 9; return join(ds) },
		"garbage":                 func([][]byte) []byte { return bytes.Repeat([]byte{0xee}, 3000) },
		"empty":                   func([][]byte) []byte { return nil },
	} {
		if got, err := splitRun(mangle(good()), nil); !errors.Is(err, errNotRun) {
			t.Errorf("%s: split into %d, %v", name, len(got), err)
		}
	}
}

// TestSplitRunHint: a hint of the right size skips the scan, and a wrong
// one (a multiple or a fraction of the size, or a size from another run)
// changes nothing.
func TestSplitRunHint(t *testing.T) {
	r := rand.New(rand.NewPCG(7, 8))
	const spi = 0x80000042
	for _, size := range []int{packet.Overhead + 40, 700, 1400} {
		var ds [][]byte
		for k := range 6 {
			ds = append(ds, datagram(r, spi, uint64(100+k), size-packet.HeaderLen))
		}
		ds = append(ds, datagram(r, spi, 106, packet.TagLen+4))
		run := bytes.Join(ds, nil)
		for _, hint := range []int{0, size, 2 * size, size / 2, 3 * size, size + 1, 1400, 700} {
			got, used, err := splitRunHint(run, nil, hint)
			if err != nil || used != size || len(got) != len(ds) {
				t.Fatalf("size %d, hint %d: %d parts of %d, %v", size, hint, len(got), used, err)
			}
			for k := range ds {
				if !bytes.Equal(got[k], ds[k]) {
					t.Fatalf("size %d, hint %d: datagram %d differs", size, hint, k)
				}
			}
		}
	}
}

// TestSplitRunAllocates nothing when its slice has room.
func TestSplitRunAllocates(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	var run []byte
	for k := range 8 {
		run = append(run, datagram(r, 0x80000001, uint64(k+1), 1400)...)
	}
	dst := make([][]byte, 0, 64)
	if n := testing.AllocsPerRun(100, func() { dst, _ = splitRun(run, dst[:0]) }); n != 0 {
		t.Fatalf("%v allocations per run", n)
	}
}

// FuzzSplitRun: any input splits or is refused, without a panic; what
// splits covers the input exactly, each part one of our datagrams.
func FuzzSplitRun(f *testing.F) {
	r := rand.New(rand.NewPCG(5, 6))
	f.Add(bytes.Join([][]byte{datagram(r, 0x80000009, 1, 100), datagram(r, 0x80000009, 2, 100), datagram(r, 0x80000009, 3, 40)}, nil))
	f.Add(datagram(r, 0x80000009, 1, 16))
	f.Add([]byte{4, 2, 2, 3})
	f.Add(bytes.Join([][]byte{datagram(r, 0x80000009, 1, 50), datagram(r, 0x80000009, 2, 50), datagram(r, 0x80000009, 3, 50)}, nil))
	f.Fuzz(func(t *testing.T, b []byte) {
		for _, hint := range []int{0, 100 + packet.Overhead, len(b) / 2, len(b) / 3} {
			parts, size, err := splitRunHint(b, nil, hint)
			if err != nil {
				continue
			}
			total, iv := 0, uint64(0)
			for k, p := range parts {
				if len(p) < minSegment || !pspHeaderOK(p, binary.BigEndian.Uint32(b[4:8])) {
					t.Fatalf("hint %d: a part that is not one of our datagrams: %x", hint, p[:min(len(p), 24)])
				}
				if next := binary.BigEndian.Uint64(p[8:16]); k > 0 && next <= iv {
					t.Fatalf("hint %d: IVs do not rise", hint)
				} else {
					iv = next
				}
				if len(p) > size || (k < len(parts)-1 && len(p) != size) {
					t.Fatalf("hint %d: part %d of %d bytes in a run of %d", hint, k, len(p), size)
				}
				total += len(p)
			}
			if total != len(b) {
				t.Fatalf("hint %d: parts cover %d of %d bytes", hint, total, len(b))
			}
		}
	})
}
