package audit

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

func clock() func() time.Time {
	t := time.Date(2026, 11, 25, 0, 0, 0, 0, time.UTC)
	var mu sync.Mutex
	return func() time.Time {
		mu.Lock()
		defer mu.Unlock()
		t = t.Add(time.Second)
		return t
	}
}

func fill(t *testing.T, path string, n int) {
	t.Helper()
	l, err := Open(path, clock(), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	g := uint32(4)
	k := uint32(258)
	for i := 0; i < n; i++ {
		e := Entry{Caller: "spiffe://example.org/enclave/3/server/web1", Role: "server", RPC: "GetServerKeys",
			Level: "server", IDs: &IDs{Enclave: 3, Peer: 7, Server: &k}, Generation: &g, Decision: Allow}
		if i%3 == 2 {
			e.Decision, e.Reason = Deny, "pair 3-9 not allowed by policy"
		}
		if err := l.Append(e); err != nil {
			t.Fatal(err)
		}
	}
}

func lines(t *testing.T, path string) []string {
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return strings.SplitAfter(strings.TrimSuffix(string(b), "\n"), "\n")
}

func verifyFile(path string) (Result, error) {
	f, err := os.Open(path)
	if err != nil {
		return Result{}, err
	}
	defer f.Close()
	return Verify(f)
}

func TestChain(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	fill(t, path, 10)
	fill(t, path, 5) // reopened: the chain continues
	res, err := verifyFile(path)
	if err != nil || res.Entries != 15 {
		t.Fatalf("verify: %+v, %v", res, err)
	}
	st, _ := os.Stat(path)
	if st.Mode().Perm() != 0o600 {
		t.Fatalf("mode %v", st.Mode())
	}
}

func TestTamperingDetected(t *testing.T) {
	dir := t.TempDir()
	orig := filepath.Join(dir, "orig.log")
	fill(t, orig, 8)
	ls := lines(t, orig)
	cases := []struct {
		name     string
		edit     func([]string) []string
		wantLine int
	}{
		{"edited decision", func(l []string) []string { l[2] = strings.Replace(l[2], `"deny"`, `"allow"`, 1); return l }, 3},
		{"edited caller", func(l []string) []string { l[4] = strings.Replace(l[4], "web1", "web2", 1); return l }, 5},
		{"removed line", func(l []string) []string { return append(l[:2], l[3:]...) }, 3},
		{"removed last lines", func(l []string) []string { return l[:5] }, 0}, // a prefix is a valid log
		{"swapped lines", func(l []string) []string { l[1], l[2] = l[2], l[1]; return l }, 2},
		{"duplicated line", func(l []string) []string { return append(l[:4], append([]string{l[3]}, l[4:]...)...) }, 5},
		{"added field", func(l []string) []string { l[0] = strings.Replace(l[0], `{"seq"`, `{"key":"00","seq"`, 1); return l }, 1},
		{"garbage line", func(l []string) []string { l[6] = "hello\n"; return l }, 7},
	}
	for _, c := range cases {
		lsCopy := append([]string{}, ls...)
		data := strings.Join(c.edit(lsCopy), "")
		_, err := Verify(strings.NewReader(data))
		var ve *VerifyError
		if c.wantLine == 0 {
			if err != nil {
				t.Errorf("%s: %v", c.name, err)
			}
			continue
		}
		if !errors.As(err, &ve) || ve.Line != c.wantLine {
			t.Errorf("%s: %v, want an error at line %d", c.name, err, c.wantLine)
		}
	}
}

// TestTornWrite: a final line cut short by a crash is dropped on reopen; a
// damaged line in the middle makes Open refuse.
func TestTornWrite(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	fill(t, path, 4)
	f, _ := os.OpenFile(path, os.O_APPEND|os.O_WRONLY, 0)
	f.WriteString(`{"seq":5,"time":"2026-`)
	f.Close()
	fill(t, path, 2)
	if res, err := verifyFile(path); err != nil || res.Entries != 6 {
		t.Fatalf("after a torn write: %+v, %v", res, err)
	}
	ls := lines(t, path)
	ls[2] = strings.Replace(ls[2], "GetServerKeys", "GetPairKeys", 1)
	os.WriteFile(path, []byte(strings.Join(ls, "")), 0o600)
	if _, err := Open(path, nil, nil); err == nil {
		t.Fatal("Open extended a damaged log")
	}
}

func TestConcurrentAppends(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	l, err := Open(path, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 25; i++ {
				if err := l.Append(Entry{Caller: "c", Role: "admin", RPC: "AddEnclave", Decision: Allow}); err != nil {
					t.Error(err)
				}
			}
		}()
	}
	wg.Wait()
	l.Close()
	if err := l.Append(Entry{Decision: Allow}); !errors.Is(err, ErrClosed) {
		t.Fatalf("append after close: %v", err)
	}
	if res, err := verifyFile(path); err != nil || res.Entries != 200 {
		t.Fatalf("%+v, %v", res, err)
	}
	if err := (&Log{}).Append(Entry{Decision: "maybe"}); !errors.Is(err, ErrDecision) {
		t.Fatalf("bad decision: %v", err)
	}
}

func FuzzVerify(f *testing.F) {
	path := filepath.Join(f.TempDir(), "seed.log")
	l, _ := Open(path, clock(), nil)
	_ = l.Append(Entry{Caller: "c", Role: "r", RPC: "x", Decision: Allow})
	_ = l.Append(Entry{Caller: "c", Role: "r", RPC: "y", Decision: Deny, Reason: "no"})
	l.Close()
	seed, _ := os.ReadFile(path)
	f.Add(seed)
	f.Add([]byte("{}\n"))
	var seedHashes []string
	for _, line := range bytes.Split(bytes.TrimSpace(seed), []byte("\n")) {
		var e Entry
		_ = json.Unmarshal(line, &e)
		seedHashes = append(seedHashes, e.Hash)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		res, err := Verify(bytes.NewReader(data))
		if err != nil {
			return
		}
		// Whatever verifies is a chain from the genesis value; without
		// forging SHA-256 its entries can only be the seed's own.
		sc := bufio.NewScanner(bytes.NewReader(data))
		for i := 0; sc.Scan(); i++ {
			var e Entry
			if json.Unmarshal(sc.Bytes(), &e) != nil || i >= len(seedHashes) || e.Hash != seedHashes[i] {
				t.Fatalf("forged entry %d verified (%d entries): %q", i+1, res.Entries, data)
			}
		}
	})
}

// TestSealIsMarshal: the line seal builds is exactly json.Marshal of the
// entry with its hash (Verify relies on one exact encoding).
func TestSealIsMarshal(t *testing.T) {
	g, k := uint32(3), uint32(258)
	for _, e := range []Entry{
		{Seq: 1, Caller: "c", Role: "r", RPC: "x", Decision: Allow, Prev: genesis},
		{Seq: 9, Time: time.Now(), Caller: "spiffe://o/a", Role: "admin", RPC: "GetServerKeys", Level: "server",
			IDs: &IDs{Enclave: 3, Peer: 7, Server: &k, Device: "web1", Pairs: []string{"3-7"}}, Generation: &g,
			Decision: Deny, Reason: "quote \" and <html> & unicode é", Prev: genesis},
	} {
		line, err := e.seal(nil)
		if err != nil {
			t.Fatal(err)
		}
		want, _ := json.Marshal(e)
		if !bytes.Equal(line, want) {
			t.Fatalf("seal\n%s\nmarshal\n%s", line, want)
		}
	}
}

// TestLineLimit: the writer refuses an entry whose line would exceed
// MaxLine (and stays open); anything it wrote, up to MaxLine, verifies.
func TestLineLimit(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	l, err := Open(path, clock(), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	base := Entry{Caller: "spiffe://example.org/admin/alice", Role: "admin", RPC: "AddEnclave", Decision: Deny}
	probe, _, _ := Next(GenesisHead(), base, time.Date(2026, 11, 25, 0, 0, 1, 0, time.UTC), nil)
	fits := base
	fits.Reason = strings.Repeat("r", MaxLine-len(probe)-len(`,"reason":""`))
	if err := l.Append(fits); err != nil {
		t.Fatalf("an entry of exactly MaxLine bytes: %v", err)
	}
	over := base
	over.Reason = strings.Repeat("r", MaxLine)
	if err := l.Append(over); !errors.Is(err, ErrTooLong) {
		t.Fatalf("an over-long entry: %v, want ErrTooLong", err)
	}
	if _, _, err := Next(GenesisHead(), over, time.Now(), nil); !errors.Is(err, ErrTooLong) {
		t.Fatalf("Next with an over-long entry: %v", err)
	}
	if err := l.Append(base); err != nil {
		t.Fatalf("the log closed after a refused entry: %v", err)
	}
	res, err := verifyFile(path)
	if err != nil || res.Entries != 2 {
		t.Fatalf("verify: %+v, %v", res, err)
	}
	if n := len(lines(t, path)[0]); n != MaxLine+1 {
		t.Fatalf("first line is %d bytes with its newline, want %d", n, MaxLine+1)
	}
	// A longer line, however it got there, is named as such.
	long := `{"seq":1,` + strings.Repeat(" ", MaxLine) + "}\n"
	var ve *VerifyError
	if _, err := Verify(strings.NewReader(long)); !errors.As(err, &ve) || ve.Line != 1 || !strings.Contains(err.Error(), "longer than") {
		t.Fatalf("over-long line: %v", err)
	}
}

// TestExactBytes: a CR before the newline (a CRLF copy), or a final line
// without its newline, is not the writer's log.
func TestExactBytes(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	fill(t, path, 3)
	ls := lines(t, path)
	crlf := strings.ReplaceAll(strings.Join(ls, ""), "\n", "\r\n")
	var ve *VerifyError
	if _, err := Verify(strings.NewReader(crlf)); !errors.As(err, &ve) || ve.Line != 1 {
		t.Fatalf("CRLF copy: %v, want an error at line 1", err)
	}
	os.WriteFile(path, []byte(crlf), 0o600)
	if _, err := Open(path, nil, nil); err == nil {
		t.Fatal("Open extended a CRLF copy")
	}
	unterminated := strings.TrimSuffix(strings.Join(ls, ""), "\n")
	if _, err := Verify(strings.NewReader(unterminated)); !errors.As(err, &ve) || ve.Line != 3 || !strings.Contains(err.Error(), "no newline") || !errors.Is(err, ErrTornEnd) {
		t.Fatalf("unterminated last line: %v", err)
	}
	// Walk gives the whole entries before a torn end, and says it is torn.
	var seen []uint64
	res, err := Walk(strings.NewReader(unterminated), func(e Entry) { seen = append(seen, e.Seq) })
	if !errors.Is(err, ErrTornEnd) || res.Entries != 2 || !slices.Equal(seen, []uint64{1, 2}) {
		t.Fatalf("Walk over a torn end: %v, %d entries, saw %v", err, res.Entries, seen)
	}
	if _, err := Walk(strings.NewReader(crlf), func(Entry) {}); errors.Is(err, ErrTornEnd) {
		t.Fatal("an edited line counts as a torn end")
	}
}

// TestTornBytesReported: Open says how much of a torn line it dropped.
func TestTornBytesReported(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	fill(t, path, 2)
	f, _ := os.OpenFile(path, os.O_APPEND|os.O_WRONLY, 0)
	f.WriteString(`{"seq":3,"ti`)
	f.Close()
	l, err := Open(path, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if l.TornBytes() != 12 {
		t.Fatalf("TornBytes = %d, want 12", l.TornBytes())
	}
}

// TestOneWriter: a second writer is refused while the first holds the log,
// and welcome once it has closed it.
func TestOneWriter(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	l, err := Open(path, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Open(path, nil, nil); !errors.Is(err, ErrLocked) {
		t.Fatalf("second writer: %v, want ErrLocked", err)
	}
	l.Close()
	l2, err := Open(path, nil, nil)
	if err != nil {
		t.Fatalf("after the first closed: %v", err)
	}
	l2.Close()
}

// TestLongUnterminatedTail: a tail longer than any line with no line end
// is damage, not a torn write, and Open does not cut it off.
func TestLongUnterminatedTail(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	fill(t, path, 2)
	f, _ := os.OpenFile(path, os.O_APPEND|os.O_WRONLY, 0)
	f.WriteString(strings.Repeat("x", MaxLine+10))
	f.Close()
	before, _ := os.Stat(path)
	if _, err := Open(path, nil, nil); err == nil || !strings.Contains(err.Error(), "damage") {
		t.Fatalf("Open: %v", err)
	}
	if after, _ := os.Stat(path); after.Size() != before.Size() {
		t.Fatal("Open cut the damaged tail")
	}
}

// TestFullDiskRecovers (issue 31): when the log's disk is full, Append
// and Healthy say so and nothing is acknowledged; when room returns, the
// log takes entries again by itself (no restart), the entries whose
// writes failed are gone, and the file verifies.
func TestFullDiskRecovers(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("mounting a small tmpfs needs root (CI runs this as root)")
	}
	dir := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", dir).CombinedOutput(); err != nil {
		t.Skipf("no tmpfs here: %v %s", err, out)
	}
	defer exec.Command("umount", "-l", dir).Run()
	path := filepath.Join(dir, "audit.log")
	l, err := Open(path, clock(), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	e := Entry{Caller: "spiffe://example.org/enclave/3/server/web1", Role: "server", RPC: "GetServerKeys", Decision: Allow, Reason: strings.Repeat("x", 200)}
	for range 10 {
		if err := l.Append(e); err != nil {
			t.Fatal(err)
		}
	}
	// Fill the disk.
	filler := filepath.Join(dir, "filler")
	f, _ := os.Create(filler)
	f.Write(make([]byte, 1<<20))
	f.Close()
	acked, failed := 10, 0
	for range 2000 {
		if err := l.Append(e); err != nil {
			failed++
			break
		}
		acked++
	}
	if failed == 0 {
		t.Fatal("the log never filled its disk")
	}
	if err := l.Healthy(); err == nil {
		t.Fatal("a log on a full disk says it is healthy")
	}
	if err := l.Append(e); err == nil {
		t.Fatal("an entry was taken on a full disk")
	}
	os.Remove(filler)
	deadline := time.Now().Add(5 * time.Second)
	for l.Healthy() != nil {
		if time.Now().After(deadline) {
			t.Fatalf("the log did not recover once its disk had room: %v", l.Healthy())
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err := l.Append(e); err != nil {
		t.Fatalf("after recovery: %v", err)
	}
	res, err := verifyFile(path)
	if err != nil {
		t.Fatalf("the log after recovery: %v", err)
	}
	if res.Entries != acked+1 {
		t.Fatalf("%d entries after recovery, want the %d acknowledged and the new one", res.Entries, acked)
	}
}
