package kdf

import (
	"bufio"
	"bytes"
	"encoding/hex"
	"errors"
	"math/rand/v2"
	"os/exec"
	"strconv"
	"strings"
	"testing"

	"github.com/enclavekeys/enclave/internal/testvec"
)

type cavpCase struct {
	count       int
	bits        int
	ki, fixed   []byte
	ko          []byte
	fixedLength int
}

// readCAVP parses the KBKDF counter-mode response file.
func readCAVP(t *testing.T) []cavpCase {
	t.Helper()
	f := bytes.NewReader(testvec.Read(t, "nist-kbkdf/kbkdf_cmac_aes256.rsp"))
	var err error
	var cases []cavpCase
	var cur *cavpCase
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		name, value, ok := strings.Cut(line, " = ")
		if !ok {
			if c, ok := strings.CutPrefix(line, "COUNT="); ok {
				n, err := strconv.Atoi(c)
				if err != nil {
					t.Fatal(err)
				}
				cases = append(cases, cavpCase{count: n})
				cur = &cases[len(cases)-1]
			}
			continue
		}
		if cur == nil {
			t.Fatalf("%q before the first COUNT", line)
		}
		switch name {
		case "L":
			cur.bits, err = strconv.Atoi(value)
		case "KI":
			cur.ki = testvec.Hex(t, value)
		case "FixedInputDataByteLen":
			cur.fixedLength, err = strconv.Atoi(value)
		case "FixedInputData":
			cur.fixed = testvec.Hex(t, value)
		case "KO":
			cur.ko = testvec.Hex(t, value)
		default:
			t.Fatalf("unknown field %q", name)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return cases
}

// TestCAVP runs all 40 NIST CAVP KBKDF counter-mode CMAC-AES256 vectors.
func TestCAVP(t *testing.T) {
	cases := readCAVP(t)
	if len(cases) != 40 {
		t.Fatalf("parsed %d cases, want 40", len(cases))
	}
	for _, c := range cases {
		if len(c.fixed) != c.fixedLength || c.bits != 8*len(c.ko) {
			t.Fatalf("COUNT=%d: inconsistent vector", c.count)
		}
		var p PRF
		if err := p.Init(c.ki); err != nil {
			t.Fatal(err)
		}
		out := make([]byte, c.bits/8)
		if err := p.DeriveFixed(out, c.fixed); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(out, c.ko) {
			t.Errorf("COUNT=%d (L=%d): got %x, want %x", c.count, c.bits, out, c.ko)
		}
	}
}

// TestPSP holds the SA-key vectors of the PSP Architecture Specification
// (Nov 2022): CK = KDF(MK, "Pv0"|"Pv1", [spi]32, 128|256), MK1 for SPIs with
// bit 31 set.
func TestPSP(t *testing.T) {
	const (
		mk0 = "34448a064292601b11a0978f56a2d34cf3fc35ede1a6bc04f8db3e5243a2b0ca"
		mk1 = "563952565d3a78ae773ec1b779f2f2d99f4a7f53a6fbb9b07d5b71f39364d739"
	)
	tests := []struct {
		mk, label, spi, want string
	}{
		{mk0, "Pv0", "12345678", "96c22dc799198090b74b70ae468e4e30"},
		{mk1, "Pv0", "9a345678", "3946da2554eae46ad1ef77a64372edc4"},
		{mk0, "Pv1", "12345678", "2b7d72074e42ca334487f2990e3f8c4037e436f38283449b76463e9b7fb2e3de"},
	}
	for _, tt := range tests {
		got, err := Derive(testvec.Hex(t, tt.mk), []byte(tt.label), testvec.Hex(t, tt.spi), 4*len(tt.want))
		if err != nil {
			t.Fatal(err)
		}
		if hex.EncodeToString(got) != tt.want {
			t.Errorf("%s spi %s: got %x, want %s", tt.label, tt.spi, got, tt.want)
		}
	}
}

// TestDeriveMatchesFixed checks that Derive encodes Label || 0x00 ||
// Context || [L]32 as SP 800-108 says, for many lengths.
func TestDeriveMatchesFixed(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	key := make([]byte, KeySize)
	for i := range key {
		key[i] = byte(r.Uint32())
	}
	var p PRF
	if err := p.Init(key); err != nil {
		t.Fatal(err)
	}
	for _, ll := range []int{0, 3, 12, 40, 100} {
		for _, cl := range []int{0, 4, 8, 60, 120} {
			for _, n := range []int{1, 16, 17, 32, 40, 100} {
				label, ctx := make([]byte, ll), make([]byte, cl)
				for i := range label {
					label[i] = byte(r.Uint32())
				}
				for i := range ctx {
					ctx[i] = byte(r.Uint32())
				}
				fixed := append(append(append(append([]byte{}, label...), 0), ctx...), 0, 0, 0, 0)
				bits := uint32(n * 8)
				fixed[len(fixed)-4], fixed[len(fixed)-3], fixed[len(fixed)-2], fixed[len(fixed)-1] =
					byte(bits>>24), byte(bits>>16), byte(bits>>8), byte(bits)
				a, b := make([]byte, n), make([]byte, n)
				if err := p.Derive(a, label, ctx); err != nil {
					t.Fatal(err)
				}
				if err := p.DeriveFixed(b, fixed); err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(a, b) {
					t.Fatalf("label %d ctx %d out %d: Derive %x != DeriveFixed %x", ll, cl, n, a, b)
				}
				// A shorter output is not a prefix of a longer one: L is an input.
				if n > 1 {
					c := make([]byte, n-1)
					_ = p.Derive(c, label, ctx)
					if bytes.Equal(c, a[:n-1]) {
						t.Fatalf("output of %d bytes is a prefix of %d", n-1, n)
					}
				}
			}
		}
	}
}

// TestOpenSSL cross-checks against OpenSSL 3's KBKDF where the openssl
// command is installed (.ci/run installs it).
func TestOpenSSL(t *testing.T) {
	bin, err := exec.LookPath("openssl")
	if err != nil {
		t.Skip("openssl not installed; apt-get install openssl to run this cross-check")
	}
	r := rand.New(rand.NewPCG(5, 6))
	for i := 0; i < 8; i++ {
		key, label, ctx := make([]byte, 32), make([]byte, 1+i*3), make([]byte, 2+i*5)
		for _, b := range [][]byte{key, label, ctx} {
			for j := range b {
				b[j] = byte(r.Uint32())
			}
		}
		n := 16 + 8*i
		out, err := exec.Command(bin, "kdf", "-keylen", strconv.Itoa(n),
			"-kdfopt", "mac:CMAC", "-kdfopt", "cipher:AES-256-CBC",
			"-kdfopt", "hexkey:"+hex.EncodeToString(key),
			"-kdfopt", "hexsalt:"+hex.EncodeToString(label),
			"-kdfopt", "hexinfo:"+hex.EncodeToString(ctx), "KBKDF").Output()
		if err != nil {
			t.Skipf("this openssl has no KBKDF (%v)", err)
		}
		want := strings.ToLower(strings.ReplaceAll(strings.TrimSpace(string(out)), ":", ""))
		got, err := Derive(key, label, ctx, 8*n)
		if err != nil {
			t.Fatal(err)
		}
		if hex.EncodeToString(got) != want {
			t.Errorf("case %d: got %x, openssl %s", i, got, want)
		}
	}
}

func TestErrors(t *testing.T) {
	for _, n := range []int{0, 16, 31, 33} {
		if _, err := Derive(make([]byte, n), nil, nil, 256); !errors.Is(err, ErrKeySize) {
			t.Errorf("key of %d bytes: %v, want ErrKeySize", n, err)
		}
	}
	for _, bits := range []int{0, -8, 7, 129} {
		if _, err := Derive(make([]byte, 32), nil, nil, bits); !errors.Is(err, ErrOutputSize) {
			t.Errorf("L = %d: %v, want ErrOutputSize", bits, err)
		}
	}
	var p PRF
	if err := p.Derive(make([]byte, 32), nil, nil); !errors.Is(err, ErrNoKey) {
		t.Errorf("zero PRF: %v, want ErrNoKey", err)
	}
	if err := p.Init(make([]byte, 32)); err != nil {
		t.Fatal(err)
	}
	if err := p.Derive(nil, nil, nil); !errors.Is(err, ErrOutputSize) {
		t.Errorf("empty output: %v, want ErrOutputSize", err)
	}
	if err := p.DeriveFixed(nil, nil); !errors.Is(err, ErrOutputSize) {
		t.Errorf("empty output (fixed): %v, want ErrOutputSize", err)
	}
	if err := p.Init(make([]byte, 5)); err == nil {
		t.Error("Init accepted a 5-byte key")
	}
	if err := p.Derive(make([]byte, 32), nil, nil); !errors.Is(err, ErrNoKey) {
		t.Errorf("after failed Init: %v, want ErrNoKey", err)
	}
}

// TestNoAllocs: a derivation into memory the caller keeps (here, captured
// by the closure, so on the heap) allocates nothing.
func TestNoAllocs(t *testing.T) {
	var p PRF
	if err := p.Init(make([]byte, 32)); err != nil {
		t.Fatal(err)
	}
	var out [32]byte
	label, ctx := []byte("enclave-pair"), make([]byte, 8)
	n := testing.AllocsPerRun(100, func() { _ = p.Derive(out[:], label, ctx) })
	if n != 0 {
		t.Fatalf("Derive allocates %v times, want 0", n)
	}
}

func FuzzDerive(f *testing.F) {
	f.Add(make([]byte, 32), []byte("Pv1"), []byte{0x80, 0, 0x12, 0x34}, uint16(32))
	f.Add(make([]byte, 31), []byte(""), []byte(""), uint16(0))
	f.Add(make([]byte, 32), make([]byte, 200), make([]byte, 9), uint16(1000))
	f.Fuzz(func(t *testing.T, key, label, ctx []byte, n uint16) {
		out, err := Derive(key, label, ctx, 8*int(n))
		if err != nil {
			if len(key) == KeySize && n != 0 {
				t.Fatalf("valid input refused: %v", err)
			}
			return
		}
		if len(out) != int(n) {
			t.Fatalf("got %d bytes, want %d", len(out), n)
		}
	})
}
