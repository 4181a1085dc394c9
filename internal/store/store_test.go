package store

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/enclavekeys/enclave/internal/audit"
	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/registry"
)

func kek(t testing.TB, b byte) *KEK {
	k, err := NewKEK(bytes.Repeat([]byte{b}, 32))
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func TestSeal(t *testing.T) {
	k := kek(t, 1)
	sealed, err := k.Seal("org-key", []byte("secret"))
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(sealed, []byte("secret")) {
		t.Fatal("plaintext visible")
	}
	if got, err := k.Open("org-key", sealed); err != nil || string(got) != "secret" {
		t.Fatalf("Open: %q %v", got, err)
	}
	if _, err := kek(t, 2).Open("org-key", sealed); !errors.Is(err, ErrWrongKEK) {
		t.Fatalf("wrong KEK: %v", err)
	}
	if _, err := k.Open("enclave-key-3", sealed); !errors.Is(err, ErrWrongKEK) {
		t.Fatalf("moved to another name: %v", err)
	}
	if _, err := k.Open("org-key", sealed[:10]); !errors.Is(err, ErrSealed) {
		t.Fatalf("truncated: %v", err)
	}
}

func TestLoadKEK(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "kek")
	os.WriteFile(good, []byte("00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n"), 0o600)
	if _, err := LoadKEK(good); err != nil {
		t.Fatal(err)
	}
	open := filepath.Join(dir, "open")
	os.WriteFile(open, []byte("00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"), 0o644)
	if _, err := LoadKEK(open); err == nil {
		t.Fatal("a world-readable KEK file was accepted")
	}
	short := filepath.Join(dir, "short")
	os.WriteFile(short, []byte("0011"), 0o600)
	if _, err := LoadKEK(short); !errors.Is(err, ErrKEK) {
		t.Fatalf("short KEK: %v", err)
	}
	t.Setenv(KEKEnv, "")
	if _, err := LoadKEK(""); !errors.Is(err, ErrNoKEK) {
		t.Fatalf("no KEK: %v", err)
	}
	t.Setenv(KEKEnv, "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff")
	if _, err := LoadKEK(""); err != nil {
		t.Fatalf("KEK from the environment: %v", err)
	}
}

func TestBoltOrgKey(t *testing.T) {
	path := filepath.Join(t.TempDir(), "enclave.db")
	s, err := OpenBolt(path, kek(t, 1))
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	ok1, err := OrgKey(ctx, s, kek(t, 1), nil, true)
	if err != nil {
		t.Fatal(err)
	}
	ok2, err := OrgKey(ctx, s, kek(t, 1), nil, true)
	if err != nil || !ok1.Equal(&ok2) {
		t.Fatalf("second start got another org key: %v", err)
	}
	if _, err := OrgKey(ctx, s, kek(t, 9), nil, true); !errors.Is(err, ErrWrongKEK) {
		t.Fatalf("wrong KEK: %v", err)
	}
	other := keys.Key{1}
	if _, err := OrgKey(ctx, s, kek(t, 1), &other, true); !errors.Is(err, ErrOrgKeyMismatch) {
		t.Fatalf("import over a different key: %v", err)
	}
	if got, err := OrgKey(ctx, s, kek(t, 1), &ok1, true); err != nil || !got.Equal(&ok1) {
		t.Fatalf("import of the same key: %v", err)
	}
	s.Close()
	// A fresh store imports an offered key.
	s2, _ := OpenBolt(filepath.Join(t.TempDir(), "b.db"), kek(t, 1))
	defer s2.Close()
	if got, err := OrgKey(ctx, s2, kek(t, 1), &other, true); err != nil || !got.Equal(&other) {
		t.Fatalf("import: %v", err)
	}
	raw, _ := os.ReadFile(path)
	if bytes.Contains(raw, ok1[:]) {
		t.Fatal("the org key is in the store file unsealed")
	}
	st, _ := os.Stat(path)
	if st.Mode().Perm() != 0o600 {
		t.Fatalf("store mode %v", st.Mode())
	}
}

// TestBoltNoLostUpdates: concurrent Updates each add a device; all land,
// and the registry's own rules (unique server ids) hold under contention.
func TestBoltNoLostUpdates(t *testing.T) {
	s, err := OpenBolt(filepath.Join(t.TempDir(), "enclave.db"), kek(t, 1))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ctx := context.Background()
	if _, err := s.Update(ctx, func(st *registry.State) error { return st.AddEnclave(3, "web") }); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	errs := make(chan error, 100)
	for w := 0; w < 10; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for i := 0; i < 10; i++ {
				k := keys.ServerID(i) // the same ten ids from every worker
				_, err := s.Update(ctx, func(st *registry.State) error {
					return st.AddDevice(registry.Device{Name: fmt.Sprintf("s%d-%d", w, i), Role: ca.RoleServer, Enclave: 3, ServerID: &k})
				})
				errs <- err
			}
		}(w)
	}
	wg.Wait()
	close(errs)
	okCount, dup := 0, 0
	for err := range errs {
		switch {
		case err == nil:
			okCount++
		case errors.Is(err, registry.ErrExists):
			dup++
		default:
			t.Fatal(err)
		}
	}
	st, _ := s.View(ctx)
	if okCount != 10 || dup != 90 || st.Devices.Len() != 10 {
		t.Fatalf("%d added, %d duplicates refused, %d stored", okCount, dup, st.Devices.Len())
	}
	// A failed Update changes nothing.
	if _, err := s.Update(ctx, func(st *registry.State) error {
		_ = st.AddEnclave(4, "db")
		return errors.New("abort")
	}); err == nil {
		t.Fatal("abort ignored")
	}
	if st, _ := s.View(ctx); len(st.Enclaves) != 1 {
		t.Fatal("an aborted update was committed")
	}
}

func TestBoltLockedByAnother(t *testing.T) {
	path := filepath.Join(t.TempDir(), "enclave.db")
	s, err := OpenBolt(path, kek(t, 1))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	// bbolt's lock times out (after 2 s) with an error rather than
	// hanging, and the error says what to look for.
	if _, err := OpenBolt(path, kek(t, 1)); err == nil || !strings.Contains(err.Error(), "another process holds it open") {
		t.Fatalf("a second opener: %v", err)
	}
}

// TestBoltDamagedFile (issue 31): one flipped byte anywhere in a store
// file either changes nothing the key service reads, or stops the open
// with a clear error; it never panics, never serves an empty registry in
// place of the real one, and never panics on the first write.
func TestBoltDamagedFile(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "ks.db")
	k := kek(t, 7)
	b, err := OpenBolt(path, k)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	for i := range 40 {
		if _, err := b.Update(ctx, func(st *registry.State) error {
			st.LastChange = fmt.Sprintf("change-%d", i)
			return st.AddEnclave(keys.EnclaveID(i+1), fmt.Sprintf("e%d", i+1))
		}); err != nil {
			t.Fatal(err)
		}
	}
	if err := b.SaveHead(audit.Head{Seq: 41, Hash: strings.Repeat("ab", 32)}); err != nil {
		t.Fatal(err)
	}
	if _, err := OrgKey(ctx, b, k, nil, true); err != nil {
		t.Fatal(err)
	}
	b.Close()
	good, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var same, refused int
	// The review's offsets (8202, 8208 and 16424 started empty before;
	// 16399, xor 0xff, made bbolt's check loop over 4 billion pages).
	offsets := []int{8202, 8208, 16424, 16399}
	for off := 0; off < len(good); off += 61 {
		offsets = append(offsets, off)
	}
	for _, off := range offsets {
		if off >= len(good) {
			continue
		}
		bad := bytes.Clone(good)
		bad[off] ^= 0x5a
		if off == 16399 {
			bad[off] = good[off] ^ 0xff
		}
		p := filepath.Join(dir, fmt.Sprintf("flip-%d.db", off))
		os.WriteFile(p, bad, 0o600)
		func() {
			defer func() {
				if r := recover(); r != nil {
					t.Fatalf("offset %d: a panic: %v", off, r)
				}
			}()
			d, err := OpenBolt(p, k)
			if err != nil {
				if !errors.Is(err, ErrDamaged) && !errors.Is(err, ErrTampered) && !strings.Contains(err.Error(), "decode") {
					t.Errorf("offset %d: an unclear error: %v", off, err)
				}
				refused++
				return
			}
			defer d.Close()
			st, err := d.View(ctx)
			if err != nil {
				refused++
				return
			}
			if st.LastChange != "change-39" || len(st.Enclaves) != 40 {
				t.Fatalf("offset %d: opened with another registry (last change %q, %d enclaves)", off, st.LastChange, len(st.Enclaves))
			}
			if _, err := d.Update(ctx, func(st *registry.State) error { st.LastChange = "after"; return nil }); err != nil && !errors.Is(err, ErrDamaged) {
				t.Errorf("offset %d: the first write: %v", off, err)
			}
			same++
		}()
		os.Remove(p)
	}
	t.Logf("%d flipped bytes changed nothing read, %d were refused", same, refused)
	if refused == 0 {
		t.Fatal("no flipped byte was noticed")
	}
}
