package cli

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/enclavekeys/enclave/internal/audit"
	"github.com/enclavekeys/enclave/internal/store"
)

func TestAuditVerify(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	l, err := audit.Open(path, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ {
		if err := l.Append(audit.Entry{Caller: "spiffe://o/admin/a", Role: "admin", RPC: "AddEnclave", Decision: audit.Allow}); err != nil {
			t.Fatal(err)
		}
	}
	l.Close()
	code, stdout, _ := runCLI("audit", "verify", path)
	if code != 0 || !strings.HasPrefix(stdout, "OK: 3 entries") {
		t.Fatalf("verify: %d %q", code, stdout)
	}
	b, _ := os.ReadFile(path)
	os.WriteFile(path, []byte(strings.Replace(string(b), `"seq":2,"time":"`, `"seq":2,"time":"1`, 1)), 0o600)
	code, _, stderr := runCLI("audit", "verify", path)
	if code != 1 || !strings.Contains(stderr, "line 2") {
		t.Fatalf("edited log: %d %q", code, stderr)
	}
	if code, _, _ := runCLI("audit", "verify", filepath.Join(t.TempDir(), "none")); code != 2 {
		t.Fatalf("missing file: %d", code)
	}
	if code, _, _ := runCLI("audit", "verify"); code != 2 {
		t.Fatalf("no file: %d", code)
	}
}

// TestAuditReaders: the replay of sight entries answers who could read a
// pair, now and at an earlier moment; a live log's incomplete last line is
// left out with a note; an edited log and bad flags are refused.
func TestAuditReaders(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	clock := time.Date(2026, 12, 1, 9, 0, 0, 0, time.UTC)
	l, err := audit.Open(path, func() time.Time { return clock }, nil)
	if err != nil {
		t.Fatal(err)
	}
	sight := func(change, how, dev, right string, pairs ...string) audit.Entry {
		return audit.Entry{Caller: "keyserver", Role: "keyserver", RPC: "sight", Decision: audit.Allow, Change: change,
			IDs: &audit.IDs{Device: dev, Pairs: pairs}, Sight: &audit.Sight{Change: how, Device: dev, Role: "gateway", Right: right}}
	}
	change := func(name, follows string) audit.Entry {
		return audit.Entry{Caller: "spiffe://o/admin/a", Role: "admin", RPC: "AddGrant", Decision: audit.Allow, Change: name, Follows: follows}
	}
	for _, e := range []audit.Entry{
		change("a", ""), sight("a", "gains", "edge", "pair key, by grant", "3-7", "3-9"),
		change("b", "a"), sight("b", "loses", "edge", "pair key, by grant", "3-7"),
	} {
		if err := l.Append(e); err != nil {
			t.Fatal(err)
		}
		if e.Sight != nil {
			clock = clock.Add(time.Hour)
		}
	}
	l.Close()
	if code, out, stderr := runCLI("audit", "readers", "--pair", "7-3", path); code != 0 || strings.Contains(out, "edge") || stderr != "" {
		t.Fatalf("now: %d %q %q", code, out, stderr)
	}
	if code, out, _ := runCLI("audit", "readers", "--pair", "3-7", "--at", "2026-12-01T09:30:00Z", path); code != 0 || !strings.Contains(out, "edge (gateway): pair key, by grant") {
		t.Fatalf("at 09:30: %d %q", code, out)
	}
	b, _ := os.ReadFile(path)
	os.WriteFile(path, append(b, `{"seq":5,"ti`...), 0o600) // a line being written
	if code, out, stderr := runCLI("audit", "readers", "--pair", "3-9", path); code != 0 || !strings.Contains(out, "edge") || !strings.Contains(stderr, "incomplete") {
		t.Fatalf("a live log: %d %q %q", code, out, stderr)
	}
	os.WriteFile(path, []byte(strings.Replace(string(b), `"seq":2,"time":"`, `"seq":2,"time":"1`, 1)), 0o600)
	if code, _, stderr := runCLI("audit", "readers", "--pair", "3-9", path); code != 1 || !strings.Contains(stderr, "line 2") {
		t.Fatalf("edited log: %d %q", code, stderr)
	}
	for _, args := range [][]string{{"--pair", "3", path}, {"--pair", "3-7", "--at", "yesterday", path}, {"--pair", "3-7"}} {
		if code, _, _ := runCLI(append([]string{"audit", "readers"}, args...)...); code != 2 {
			t.Errorf("%q: exit %d, want 2", args, code)
		}
	}
}

// TestAuditReadersVerified (issue 31): entries appended to a keyed log by
// someone without the KEK (a reader who never existed, dated before the
// log began) are refused once the store and KEK are given, and the answer
// says how far it was verified; a moment before the log began has no
// answer.
func TestAuditReadersVerified(t *testing.T) {
	dir := t.TempDir()
	kekPath := filepath.Join(dir, "kek")
	os.WriteFile(kekPath, []byte(strings.Repeat("ab", 32)+"\n"), 0o600)
	kek, err := store.LoadKEK(kekPath)
	if err != nil {
		t.Fatal(err)
	}
	st, err := store.OpenBolt(filepath.Join(dir, "ks.db"), kek)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "audit.log")
	clock := time.Date(2026, 12, 1, 9, 0, 0, 0, time.UTC)
	l, err := audit.Open(path, func() time.Time { return clock }, st)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range []audit.Entry{
		{Caller: "spiffe://o/admin/a", Role: "admin", RPC: "AddGrant", Decision: audit.Allow, Change: "a"},
		{Caller: "keyserver", Role: "keyserver", RPC: "sight", Decision: audit.Allow, Change: "a",
			IDs: &audit.IDs{Device: "edge", Pairs: []string{"3-7"}}, Sight: &audit.Sight{Change: "gains", Device: "edge", Role: "gateway", Right: "pair key, by grant"}},
	} {
		if err := l.Append(e); err != nil {
			t.Fatal(err)
		}
	}
	l.Close()
	st.Close()
	args := []string{"audit", "readers", "--pair", "3-7", "--at", "2026-12-01T10:00:00Z", path, "--store", filepath.Join(dir, "ks.db"), "--kek-file", kekPath}
	if code, out, stderr := runCLI(args...); code != 0 || !strings.Contains(out, "edge (gateway)") || !strings.Contains(out, "verified: the chain, the MACs of 2 entries") {
		t.Fatalf("a sound keyed log: %d %q %q", code, out, stderr)
	}
	if code, out, _ := runCLI("audit", "readers", "--pair", "3-7", path); code != 0 || !strings.Contains(out, "verified: the chain only") {
		t.Fatalf("without the store: %d %q", code, out)
	}
	// A forger's entries: well chained, no MAC.
	b, _ := os.ReadFile(path)
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	var last audit.Entry
	json.Unmarshal([]byte(lines[len(lines)-1]), &last)
	forged := audit.Entry{Caller: "keyserver", Role: "keyserver", RPC: "sight", Decision: audit.Allow, Change: "a",
		IDs: &audit.IDs{Device: "ghost", Pairs: []string{"3-7"}}, Sight: &audit.Sight{Change: "gains", Device: "ghost", Role: "monitor", Right: "org key"}}
	line, _, _ := audit.Next(audit.Head{Seq: last.Seq, Hash: last.Hash}, forged, time.Date(2026, 11, 1, 0, 0, 0, 0, time.UTC), nil)
	os.WriteFile(path, append(b, append(line, '\n')...), 0o600)
	if code, _, stderr := runCLI(args...); code != 1 || !strings.Contains(stderr, "no MAC") {
		t.Fatalf("forged entries with the store: %d %q", code, stderr)
	}
	os.WriteFile(path, b, 0o600)
	if code, _, stderr := runCLI("audit", "readers", "--pair", "3-7", "--at", "2026-11-01T00:00:00Z", path); code != 1 || !strings.Contains(stderr, "nothing is known before it") {
		t.Fatalf("before the log began: %d %q", code, stderr)
	}
}

// TestAuditAssertionHistory: audit readers with an assertion replays the
// log against it: the spans the readers broke it in, the spans the
// registry kept it in, and exit 1 if it was broken while kept.
func TestAuditAssertionHistory(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	clock := time.Date(2026, 12, 1, 9, 0, 0, 0, time.UTC)
	l, err := audit.Open(path, func() time.Time { return clock }, nil)
	if err != nil {
		t.Fatal(err)
	}
	sight := func(change, how string, pairs ...string) audit.Entry {
		return audit.Entry{Caller: "keyserver", Role: "keyserver", RPC: "sight", Decision: audit.Allow, Change: change,
			IDs: &audit.IDs{Device: "edge", Pairs: pairs}, Sight: &audit.Sight{Change: how, Device: "edge", Role: "gateway", Right: "pair key, by grant"}}
	}
	change := func(rpc, name, follows, outcome string) audit.Entry {
		return audit.Entry{Caller: "spiffe://o/admin/a", Role: "admin", RPC: rpc, Decision: audit.Allow, Change: name, Follows: follows, Reason: outcome}
	}
	kept := func(name, outcome string) audit.Entry {
		return audit.Entry{Caller: "keyserver", Role: "keyserver", RPC: "assertion", Decision: audit.Allow, Change: name, Reason: outcome}
	}
	// 09:00 edge gains 3-7; 10:00 loses it; 11:00 the assertion is kept;
	// 12:00 edge gains 3-7 again (a path that broke it while kept).
	for _, e := range []audit.Entry{
		change("AddGrant", "a", "", ""), sight("a", "gains", "3-7"),
		change("RevokeGrant", "b", "a", ""), sight("b", "loses", "3-7"),
		change("AddAssertion", "c", "b", "assertion never: {reader: edge, pair: 3-7} kept: every change that would break it is refused"), kept("c", "kept: never: {reader: edge, pair: 3-7}"),
		change("AddGrant", "d", "c", ""), sight("d", "gains", "3-7"),
	} {
		if err := l.Append(e); err != nil {
			t.Fatal(err)
		}
		clock = clock.Add(time.Hour)
	}
	l.Close()
	code, out, stderr := runCLI("audit", "readers", "--never", "--reader", "edge", "--pair", "7-3", path)
	for _, want := range []string{
		"assertion never: {reader: edge, pair: 3-7}",
		"kept: 2026-12-01T13:00:00Z until the log's end",
		"broken while not kept: 2026-12-01T09:00:00Z until 2026-12-01T11:00:00Z\n  edge (gateway) could read pair 3-7 by pair key, by grant",
		"broken WHILE KEPT: 2026-12-01T15:00:00Z until the log's end",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("the history lacks %q:\n%s", want, out)
		}
	}
	if code != 1 || !strings.Contains(stderr, "broken while the registry kept it") {
		t.Errorf("a break while kept: exit %d, %q", code, stderr)
	}
	code, out, _ = runCLI("audit", "readers", "--never", "--reader", "role:monitor", "--pair", "3-7", "--json", path)
	var h struct {
		Assertion string
		Kept      []any
		Broken    []any
	}
	if err := json.Unmarshal([]byte(out), &h); code != 0 || err != nil || len(h.Broken) != 0 || len(h.Kept) != 0 {
		t.Errorf("an assertion never broken nor kept: exit %d, %v, %s", code, err, out)
	}
	if code, _, _ := runCLI("audit", "readers", "--never", "--readers", "a,b", "--pair", "3-7", path); code != 2 {
		t.Errorf("--never with --readers: exit %d, want 2", code)
	}
}

// TestAuditAssertionAfterRestore: a key server restored to an old store
// (its log says "restore", naming the restored tip) has the registry of
// that tip again: the readers the later changes took away read again, and
// an assertion kept after that tip is kept no more.
func TestAuditAssertionAfterRestore(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	clock := time.Date(2026, 12, 1, 9, 0, 0, 0, time.UTC)
	l, err := audit.Open(path, func() time.Time { return clock }, nil)
	if err != nil {
		t.Fatal(err)
	}
	sight := func(change, how string) audit.Entry {
		return audit.Entry{Caller: "keyserver", Role: "keyserver", RPC: "sight", Decision: audit.Allow, Change: change,
			IDs: &audit.IDs{Device: "edge", Pairs: []string{"3-7"}}, Sight: &audit.Sight{Change: how, Device: "edge", Role: "gateway", Right: "pair key, by grant"}}
	}
	change := func(rpc, name, follows, outcome string) audit.Entry {
		return audit.Entry{Caller: "spiffe://o/admin/a", Role: "admin", RPC: rpc, Decision: audit.Allow, Change: name, Follows: follows, Reason: outcome}
	}
	kept := func(name, outcome string) audit.Entry {
		return audit.Entry{Caller: "keyserver", Role: "keyserver", RPC: "assertion", Decision: audit.Allow, Change: name, Reason: outcome}
	}
	for _, e := range []audit.Entry{
		change("AddGrant", "a", "", ""), sight("a", "gains"), // 09:00, 10:00
		change("RevokeGrant", "b", "a", ""), sight("b", "loses"), // 11:00, 12:00
		change("AddAssertion", "c", "b", "assertion never: {reader: edge, pair: 3-7} kept: every change that would break it is refused"), // 13:00
		kept("c", "kept: never: {reader: edge, pair: 3-7}"), // 14:00, of the change at 13:00
		{Caller: "keyserver", Role: "keyserver", RPC: "restore", Decision: audit.Allow, Follows: "a", Reason: "the changes after a are void"}, // 15:00
	} {
		if err := l.Append(e); err != nil {
			t.Fatal(err)
		}
		clock = clock.Add(time.Hour)
	}
	l.Close()
	if code, out, _ := runCLI("audit", "readers", "--pair", "3-7", path); code != 0 || !strings.Contains(out, "edge (gateway)") {
		t.Errorf("the readers after the restore: exit %d\n%s", code, out)
	}
	code, out, _ := runCLI("audit", "readers", "--never", "--reader", "edge", "--pair", "3-7", path)
	for _, want := range []string{"kept: 2026-12-01T13:00:00Z until 2026-12-01T15:00:00Z", "broken while not kept: 2026-12-01T15:00:00Z until the log's end"} {
		if !strings.Contains(out, want) {
			t.Errorf("the history lacks %q:\n%s", want, out)
		}
	}
	if code != 0 || strings.Contains(out, "WHILE KEPT") {
		t.Errorf("exit %d:\n%s", code, out)
	}
}
