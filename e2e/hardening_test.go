package e2e

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	bolt "go.etcd.io/bbolt"
)

// orgEnv is an env with a key server's certificates, a KEK, and one run of
// the key server that registered an enclave (so the store and audit log
// hold an organisation); the server is stopped again.
func orgEnv(t *testing.T) *env {
	e := newEnv(t)
	e.issue("ks", "keyserver", "--host", "127.0.0.1")
	e.issue("alice", "admin")
	e.ok("keys", "generate", "--out", "kek")
	os.Chmod(e.dir+"/kek", 0o600)
	ks := e.start()
	e.ok("admin", "--keyserver", ks.addr, "--ca", "ca/ca.crt", "--cert", "certs/alice.crt", "--key", "certs/alice.key", "enclave", "add", "--id", "3", "--name", "web")
	e.ok("admin", "--keyserver", ks.addr, "--ca", "ca/ca.crt", "--cert", "certs/alice.crt", "--key", "certs/alice.key", "enclave", "add", "--id", "7", "--name", "db")
	ks.stop()
	return e
}

// startFails runs the key server and expects it to refuse to start.
func (e *env) startFails(want string, extra ...string) {
	e.t.Helper()
	args := append([]string{"keyserver", "--ca", "ca/ca.crt", "--cert", "certs/ks.crt", "--key", "certs/ks.key",
		"--kek-file", "kek", "--listen", "127.0.0.1:0", "--metrics-listen", ""}, extra...)
	if !containsFlag(extra, "--store") && !containsFlag(extra, "--etcd") {
		args = append(args, "--store", "ks.db", "--audit", "audit.log")
	}
	code, _, errs := e.run(args...)
	if code == 0 || !strings.Contains(errs, want) {
		e.t.Fatalf("keyserver %v: exit %d, want a refusal mentioning %q:\n%s", extra, code, want, errs)
	}
}

func containsFlag(args []string, f string) bool {
	for _, a := range args {
		if a == f {
			return true
		}
	}
	return false
}

// TestLostOrgKeyNotReplaced: a store emptied to 0 bytes, or one whose
// sealed org key alone was deleted, does not start with a fresh org key;
// --new-org-key does it on purpose.
func TestLostOrgKeyNotReplaced(t *testing.T) {
	e := orgEnv(t)
	good, _ := os.ReadFile(e.dir + "/ks.db")

	os.WriteFile(e.dir+"/ks.db", nil, 0o600)
	e.startFails("audit log")

	os.WriteFile(e.dir+"/ks.db", good, 0o600)
	db, err := bolt.Open(e.dir+"/ks.db", 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := db.Update(func(tx *bolt.Tx) error { return tx.Bucket([]byte("secrets")).Delete([]byte("org-key")) }); err != nil {
		t.Fatal(err)
	}
	db.Close()
	e.startFails("2 enclaves")
	e.startFails("--new-org-key")

	ks := e.start("--new-org-key")
	ks.stop()
	if out := e.ok("audit", "verify", "audit.log", "--store", "ks.db", "--kek-file", "kek"); !strings.Contains(out, "reaching the store's anchor") {
		t.Fatalf("verify after --new-org-key: %s", out)
	}
}

// TestAuditLogCutShort: lines removed from the end of the log, or the log
// emptied, stop the start and fail `audit verify --store`.
func TestAuditLogCutShort(t *testing.T) {
	e := orgEnv(t)
	raw, _ := os.ReadFile(e.dir + "/audit.log")
	lines := strings.SplitAfter(strings.TrimSuffix(string(raw), "\n"), "\n")
	for _, cut := range []string{strings.Join(lines[:len(lines)-1], ""), ""} {
		os.WriteFile(e.dir+"/audit.log", []byte(cut), 0o600)
		e.startFails("removed from the end")
		code, _, errs := e.run("audit", "verify", "audit.log", "--store", "ks.db", "--kek-file", "kek")
		if code != 1 || !strings.Contains(errs, "removed from the end") {
			t.Fatalf("verify of a cut log: %d %s", code, errs)
		}
		// Without the store the chain alone cannot tell, and says so.
		if out := e.ok("audit", "verify", "audit.log"); !strings.Contains(out, "not checked against the store's anchor") {
			t.Fatalf("plain verify: %s", out)
		}
	}
}

// TestStoreRegistryEdited: four bytes changed in the store file (a revoked
// device un-revoked) stop the start.
func TestStoreRegistryEdited(t *testing.T) {
	e := orgEnv(t)
	raw, _ := os.ReadFile(e.dir + "/ks.db")
	edited := strings.ReplaceAll(string(raw), `"name":"web"`, `"name":"wEb"`) // every copy: freed pages keep old versions
	if edited == string(raw) {
		t.Fatal("the registry's bytes are not where the test expects them")
	}
	os.WriteFile(e.dir+"/ks.db", []byte(edited), 0o600)
	e.startFails("does not match its MAC")
}

// TestOneWriterPerAuditLog: a second key server pointed at an audit log in
// use is refused, and the store it would have created is not left behind.
func TestOneWriterPerAuditLog(t *testing.T) {
	e := orgEnv(t)
	ks := e.start()
	defer ks.stop()
	e.startFails("in use by another process", "--store", "second.db", "--audit", "audit.log", "--new-org-key")
	if _, err := os.Stat(filepath.Join(e.dir, "second.db")); !os.IsNotExist(err) {
		t.Fatalf("a failed start left its new store behind: %v", err)
	}
}

// TestFailedStartLeavesNothing: a start refused for its flags creates no
// store or audit file.
func TestFailedStartLeavesNothing(t *testing.T) {
	e := newEnv(t)
	e.issue("ks", "keyserver", "--host", "127.0.0.1")
	e.ok("keys", "generate", "--out", "kek")
	os.Chmod(e.dir+"/kek", 0o600)
	base := []string{"keyserver", "--ca", "ca/ca.crt", "--cert", "certs/ks.crt", "--key", "certs/ks.key", "--store", "ks.db", "--audit", "audit.log", "--metrics-listen", ""}
	for _, extra := range [][]string{
		{"--kek-file", "kek", "--listen", "256.0.0.1:99999"},
		{"--kek-file", "nosuch", "--listen", "127.0.0.1:0"},
	} {
		if code, _, errs := e.run(append(base, extra...)...); code != 2 {
			t.Fatalf("%v: exit %d %s", extra, code, errs)
		}
		for _, f := range []string{"ks.db", "audit.log"} {
			if _, err := os.Stat(filepath.Join(e.dir, f)); !os.IsNotExist(err) {
				t.Fatalf("%v left %s behind", extra, f)
			}
		}
	}
}

// TestRestoreFromBackup (issue 31): the restore OPERATIONS.md describes,
// with real processes: a store backed up after a clean stop and put back
// after more changes is refused with what to do; with --restored it
// serves, says so, and leases no SPI range the log shows leased; the
// next start needs no flag.
func TestRestoreFromBackup(t *testing.T) {
	e := orgEnv(t) // two enclaves added, stopped cleanly
	raw, err := os.ReadFile(e.dir + "/ks.db")
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(e.dir+"/backup.db", raw, 0o600)
	ks := e.start()
	e.ok("admin", "--keyserver", ks.addr, "--ca", "ca/ca.crt", "--cert", "certs/alice.crt", "--key", "certs/alice.key", "enclave", "add", "--id", "9", "--name", "lab")
	ks.stop()
	backup, _ := os.ReadFile(e.dir + "/backup.db")
	os.WriteFile(e.dir+"/ks.db", backup, 0o600)
	e.startFails("--restored")
	ks = e.start("--restored")
	if !strings.Contains(ks.stderr.String(), "serving it as restored") {
		t.Fatalf("the restore was not logged:\n%s", ks.stderr)
	}
	list := e.ok("admin", "--keyserver", ks.addr, "--ca", "ca/ca.crt", "--cert", "certs/alice.crt", "--key", "certs/alice.key", "status")
	if strings.Contains(list, "lab") || !strings.Contains(list, "web") {
		t.Fatalf("the restored registry:\n%s", list)
	}
	ks.stop()
	ks = e.start() // the log holds the restore: no flag needed again
	ks.stop()
	if out := e.ok("audit", "verify", "audit.log", "--store", "ks.db", "--kek-file", "kek"); !strings.Contains(out, "reaching the store's anchor") {
		t.Fatalf("audit verify after the restore: %s", out)
	}
}
