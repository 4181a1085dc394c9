package store

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/enclavekeys/enclave/internal/audit"
	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/etcdtest"
	"github.com/enclavekeys/enclave/internal/registry"
)

// TestBoltRegistryTampered: changing bytes of the registry in the store
// file (a revoked gateway un-revoked, as an attacker with the file would)
// stops the next open; a different KEK does too.
func TestBoltRegistryTampered(t *testing.T) {
	path := filepath.Join(t.TempDir(), "enclave.db")
	s, err := OpenBolt(path, kek(t, 1))
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	_, err = s.Update(ctx, func(st *registry.State) error {
		if err := st.AddDevice(registry.Device{Name: "gw", Role: ca.RoleGateway}); err != nil {
			return err
		}
		_, err := st.RevokeDevice("gw", time.Now())
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
	if _, err := OpenBolt(path, kek(t, 2)); !errors.Is(err, ErrTampered) {
		t.Fatalf("another KEK: %v, want ErrTampered", err)
	}
	raw, _ := os.ReadFile(path)
	edited := bytes.Replace(raw, []byte(`"revoked":true`), []byte(`"revoked":null`), 1)
	if bytes.Equal(raw, edited) {
		t.Fatal("the registry's bytes are not where the test expects them")
	}
	os.WriteFile(path, edited, 0o600)
	if _, err := OpenBolt(path, kek(t, 1)); !errors.Is(err, ErrTampered) {
		t.Fatalf("edited registry: %v, want ErrTampered", err)
	}
}

// TestEtcdRegistryTampered: the same for the registry in etcd: a replica
// following it refuses every request once it sees the edit, a fresh one at
// its first read.
func TestEtcdRegistryTampered(t *testing.T) {
	c := etcdtest.Start(t, 1)
	s, err := OpenEtcd(c.Endpoints, "", kek(t, 1))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ctx := context.Background()
	if _, err := s.Update(ctx, func(st *registry.State) error { return st.AddEnclave(3, "web") }); err != nil {
		t.Fatal(err)
	}
	// The policy record edited: the replica following the records finds
	// it at once, and every request after it is refused.
	key := s.etcdKey(policyKey)
	got, _ := s.cli.Get(ctx, key)
	if len(got.Kvs) == 0 || !strings.Contains(string(got.Kvs[0].Value), `"web"`) {
		t.Fatal("the policy record is not where the test expects it")
	}
	s.cli.Put(ctx, key, strings.Replace(string(got.Kvs[0].Value), `"web"`, `"wob"`, 1))
	deadline := time.Now().Add(5 * time.Second)
	for _, err = s.View(ctx); !errors.Is(err, ErrTampered) && time.Now().Before(deadline); _, err = s.View(ctx) {
		time.Sleep(10 * time.Millisecond)
	}
	if !errors.Is(err, ErrTampered) {
		t.Fatalf("edited registry in etcd: %v, want ErrTampered", err)
	}
	// A fresh replica refuses it at its first read.
	fresh, _ := OpenEtcd(c.Endpoints, "", kek(t, 1))
	defer fresh.Close()
	if _, err := fresh.View(ctx); !errors.Is(err, ErrTampered) {
		t.Fatalf("a fresh replica on an edited registry: %v, want ErrTampered", err)
	}
	if _, err := s.Update(ctx, func(st *registry.State) error { return nil }); !errors.Is(err, ErrTampered) {
		t.Fatalf("update over an edited registry: %v, want ErrTampered", err)
	}
}

// anchoredLog opens the audit log at path anchored in s and writes n
// entries.
func anchoredLog(t *testing.T, s *Bolt, path string, n int) {
	t.Helper()
	l, err := audit.Open(path, nil, s)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < n; i++ {
		if err := l.Append(audit.Entry{Caller: "spiffe://example.org/admin/alice", Role: "admin", RPC: "AddEnclave", Decision: audit.Allow, Reason: "enclave added"}); err != nil {
			t.Fatal(err)
		}
	}
	l.Close()
}

// TestAuditAnchor: the store's anchor finds what the chain alone cannot:
// lines cut from the end, an emptied log, a log rewritten and re-hashed,
// and a log whose anchor is gone. An intact log reopens and continues.
func TestAuditAnchor(t *testing.T) {
	s, path := anchorStore(t)
	dir := filepath.Dir(path)
	anchoredLog(t, s, path, 6)
	anchoredLog(t, s, path, 2) // reopened: it reaches its anchor and goes on
	h, ok, err := s.LoadHead()
	if err != nil || !ok || h.Seq != 8 {
		t.Fatalf("anchor %+v %v %v", h, ok, err)
	}
	good, _ := os.ReadFile(path)
	lines := strings.SplitAfter(strings.TrimSuffix(string(good), "\n"), "\n")
	rehashed := rewrite(t, lines, 3)
	cases := []struct {
		name string
		data string
	}{
		{"last two lines removed", strings.Join(lines[:6], "")},
		{"emptied", ""},
		{"line 3 edited and the rest re-hashed", rehashed},
	}
	// (The re-hashed log has no MAC left, and the anchor says where the
	// keyed part begins: that alone refuses it; without that rule, the
	// anchored entry's hash would.)
	anchorOrMAC := func(err error) bool {
		return errors.Is(err, audit.ErrAnchor) || (err != nil && strings.Contains(err.Error(), "no MAC"))
	}
	for _, c := range cases {
		os.WriteFile(path, []byte(c.data), 0o600)
		if _, err := audit.Open(path, nil, s); !anchorOrMAC(err) {
			t.Errorf("%s: %v, want ErrAnchor", c.name, err)
		}
		if _, err := audit.VerifyAnchored(strings.NewReader(c.data), audit.Head{Seq: h.Seq, Hash: h.Hash}); !errors.Is(err, audit.ErrAnchor) {
			t.Errorf("%s: VerifyAnchored: %v", c.name, err)
		}
	}
	// Plain Verify sees nothing wrong with any of them: that is why the
	// anchor exists.
	for _, c := range cases {
		if _, err := audit.Verify(strings.NewReader(c.data)); err != nil {
			t.Errorf("%s: the chain alone already fails (%v); the test is not testing the anchor", c.name, err)
		}
	}
	// A store without an anchor for a written log.
	os.WriteFile(path, good, 0o600)
	s2, _ := OpenBolt(filepath.Join(dir, "other.db"), kek(t, 1))
	defer s2.Close()
	if _, err := audit.Open(path, nil, s2); !errors.Is(err, audit.ErrAnchor) {
		t.Fatalf("log without an anchor: %v, want ErrAnchor", err)
	}
	// The anchor record itself is under the MAC.
	if err := s.db.Update(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketAudit).Put(keyHead, []byte(`{"record":{"seq":2,"hash":"x"},"mac":"00"}`))
	}); err != nil {
		t.Fatal(err)
	}
	if _, _, err := s.LoadHead(); !errors.Is(err, ErrTampered) {
		t.Fatalf("forged anchor: %v, want ErrTampered", err)
	}
}

// rewrite re-makes a log with line k's (1-based) reason changed,
// re-hashing every line and dropping every MAC: what an attacker without
// the KEK can do to the file alone.
func rewrite(t *testing.T, lines []string, k int) string {
	t.Helper()
	head := audit.GenesisHead()
	var out strings.Builder
	for i, l := range lines {
		var e audit.Entry
		if err := json.Unmarshal([]byte(l), &e); err != nil {
			t.Fatal(err)
		}
		// Every line is made again, without its MAC (which needs the
		// KEK): a log with no MAC at all passes the chain's own checks.
		if i+1 == k {
			e.Reason = "nothing happened"
		}
		e.Hash, e.MAC = "", ""
		line, next, err := audit.Next(head, e, e.Time, nil) // without the KEK, as an attacker must
		if err != nil {
			t.Fatal(err)
		}
		out.Write(line)
		out.WriteByte('\n')
		head = next
	}
	return out.String()
}

// TestOrgKeyNotRecreated: a store that shows an organisation but has lost
// its org key refuses to make a new one unless asked.
func TestOrgKeyNotRecreated(t *testing.T) {
	dir := t.TempDir()
	s, err := OpenBolt(filepath.Join(dir, "enclave.db"), kek(t, 1))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ctx := context.Background()
	if ev, err := Evidence(ctx, s); err != nil || ev != "" {
		t.Fatalf("a new store shows %q %v", ev, err)
	}
	if _, err := OrgKey(ctx, s, kek(t, 1), nil, false); !errors.Is(err, ErrKeyMissing) {
		t.Fatalf("mayCreate false on an empty store: %v", err)
	}
	anchoredLog(t, s, filepath.Join(dir, "audit.log"), 1)
	if ev, _ := Evidence(ctx, s); !strings.Contains(ev, "audit log has 1 entries") {
		t.Fatalf("evidence after an audit entry: %q", ev)
	}
	s.Update(ctx, func(st *registry.State) error { return st.AddEnclave(3, "web") })
	if ev, _ := Evidence(ctx, s); !strings.Contains(ev, "1 enclaves") {
		t.Fatalf("evidence after an enclave: %q", ev)
	}
}

// TestAuditKeyed (issue 31): the log a store anchors is keyed under its
// KEK. Entries added by anyone without it are refused, whether they carry
// no MAC or a MAC under another key; a log closed cleanly takes no entry
// until a key service opens it again, even one with a good MAC; and after
// an open, a crash cannot look like that.
func TestAuditKeyed(t *testing.T) {
	s, path := anchorStore(t)
	anchoredLog(t, s, path, 4)
	good, _ := os.ReadFile(path)
	if !strings.Contains(string(good), `"mac":"`) {
		t.Fatal("the log is not keyed")
	}
	h, _, _ := s.LoadHead()
	if !h.Clean || h.KeyedFrom != 1 {
		t.Fatalf("a cleanly closed log's head: %+v, want clean and keyed from entry 1", h)
	}
	// Every MAC stripped (the hashes do not cover them): the anchor says
	// where the keyed part begins, so it is refused (issue 31 review).
	stripped := regexp.MustCompile(`,"mac":"[0-9a-f]+"`).ReplaceAllString(string(good), "")
	unclean := audit.Head{Seq: h.Seq, Hash: h.Hash, KeyedFrom: h.KeyedFrom}
	if _, err := audit.VerifyAnchoredKeyed(strings.NewReader(stripped), unclean, s.kek.AuditKeyer(), nil); err == nil || !strings.Contains(err.Error(), "no MAC") {
		t.Fatalf("a log with every MAC stripped: %v", err)
	}
	last := lastEntry(t, good)
	head := audit.Head{Seq: last.Seq, Hash: last.Hash}
	add := func(k audit.Keyer) string {
		e := audit.Entry{Caller: "spiffe://example.org/admin/mallory", Role: "admin", RPC: "sight", Decision: audit.Allow, Reason: "mallory gains sight"}
		line, _, err := audit.Next(head, e, last.Time.Add(time.Second), k)
		if err != nil {
			t.Fatal(err)
		}
		return string(good) + string(line) + "\n"
	}
	for _, c := range []struct {
		name, data, want string
	}{
		{"an entry without a MAC", add(nil), "no MAC after entries with one"},
		{"an entry under another KEK", add(kek(t, 2).AuditKeyer()), "the MAC does not verify"},
		{"an entry under the KEK, after a clean stop", add(s.kek.AuditKeyer()), "added while no key service ran"},
	} {
		os.WriteFile(path, []byte(c.data), 0o600)
		if _, err := audit.Open(path, nil, s); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want %q", c.name, err, c.want)
		}
	}
	// Opened by a key service, the head is no longer clean: entries the
	// next crash leaves past it are the service's own.
	os.WriteFile(path, good, 0o600)
	l, err := audit.Open(path, nil, s)
	if err != nil {
		t.Fatal(err)
	}
	if h, _, _ := s.LoadHead(); h.Clean {
		t.Fatal("an open log's head is still marked clean")
	}
	l.Close()
}

func lastEntry(t *testing.T, log []byte) audit.Entry {
	t.Helper()
	lines := strings.Split(strings.TrimSpace(string(log)), "\n")
	var e audit.Entry
	if err := json.Unmarshal([]byte(lines[len(lines)-1]), &e); err != nil {
		t.Fatal(err)
	}
	return e
}

// anchorStore is a new store (closed with the test) and the path of the
// audit log beside it.
func anchorStore(t *testing.T) (*Bolt, string) {
	dir := t.TempDir()
	s, err := OpenBolt(filepath.Join(dir, "enclave.db"), kek(t, 1))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s, filepath.Join(dir, "audit.log")
}
