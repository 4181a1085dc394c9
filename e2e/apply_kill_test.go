package e2e

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/enclavekeys/enclave/internal/etcdtest"
)

// TestApplyAllOrNothingKill9 (issue 34): enclave admin apply is one store
// transaction. A key-server process is killed (SIGKILL) at moments spread
// over an apply of a file that adds an enclave, a pair rule, 1000 devices
// and an assertion; restarted on the same store, the registry has all of
// the file or none of it, never a part, on bbolt and on a real etcd.
func TestApplyAllOrNothingKill9(t *testing.T) {
	if testing.Short() {
		t.Skip("kills and restarts key servers: not in -short")
	}
	t.Run("bbolt", func(t *testing.T) {
		applyKill9(t, func(e *env) *keyserver { return e.start() })
	})
	t.Run("etcd", func(t *testing.T) {
		etcd := strings.Join(etcdtest.Start(t, 1).Endpoints, ",")
		applyKill9(t, func(e *env) *keyserver { return e.startWith("--etcd", etcd) })
	})
}

func applyKill9(t *testing.T, start func(*env) *keyserver) {
	const devices = 1000
	e := newEnv(t)
	e.pairCerts()
	ks := start(e)
	e.pairRegister(ks)
	e.ok(e.admin(ks, "assert", "add", "--never", "--reader", "role:monitor", "--pair", "3-7")...)

	// batch is the export cur plus round i's enclave, rule, devices and
	// assertion, each named after i.
	batch := func(cur string, i int) string {
		id := 100 + i
		var devs strings.Builder
		for k := 0; k < devices; k++ {
			fmt.Fprintf(&devs, "  - name: d%d-%d\n    role: client\n    enclave: \"%d\"\n", i, k, id)
		}
		f := strings.Replace(cur, "enclaves:\n", fmt.Sprintf("enclaves:\n  - id: \"%d\"\n    name: e%d\n", id, i), 1)
		f = strings.Replace(f, "  allow:\n", fmt.Sprintf("  allow:\n    - 3-%d\n", id), 1)
		f = strings.Replace(f, "devices:\n", "devices:\n"+devs.String(), 1)
		return strings.Replace(f, "assertions:\n", fmt.Sprintf("assertions:\n  - never: {reader: role:gateway, pair: 3-%d}\n", id), 1)
	}
	// applied says whether round i's file is in the registry: wholly
	// (true) or not at all (false); a part fails the test.
	applied := func(export string, i int) bool {
		t.Helper()
		parts := map[string]bool{
			"enclave":   strings.Contains(export, fmt.Sprintf("id: \"%d\"\n    name: e%d\n", 100+i, i)),
			"rule":      strings.Contains(export, fmt.Sprintf("    - 3-%d\n", 100+i)),
			"assertion": strings.Contains(export, fmt.Sprintf("pair: 3-%d\n", 100+i)),
		}
		n := strings.Count(export, fmt.Sprintf("- name: d%d-", i))
		parts["devices"] = n == devices
		all := parts["enclave"]
		for what, in := range parts {
			if in != all || (!in && n != 0) {
				t.Fatalf("round %d: a part of the file is in the registry (%s %v, %d of %d devices, enclave %v):\n%s", i, what, in, n, devices, all, export)
			}
		}
		return all
	}

	// Round 0 is not killed: it measures how long an apply takes.
	// The kills are spread over the key server's part: the time of the
	// apply less that of a command that asks next to nothing (the CLI's
	// start, the connection), measured on round 1 (a registry as large as
	// the killed rounds').
	began := time.Now()
	cur := e.ok(e.admin(ks, "export")...)
	base := time.Since(began)
	var took time.Duration
	for round := 0; round < 2; round++ {
		e.writeFile("org.yaml", batch(cur, round))
		began = time.Now()
		e.ok(e.admin(ks, "apply", "org.yaml")...)
		took = time.Since(began) - base
		if cur = e.ok(e.admin(ks, "export")...); !applied(cur, round) {
			t.Fatalf("round %d did not apply", round)
		}
	}
	t.Logf("an apply of %d devices took the key server about %v (a command's start: %v)", devices, took.Round(time.Millisecond), base.Round(time.Millisecond))

	outcomes := map[bool]int{}
	round, lost := 2, -1 // lost: the last round whose apply the kill lost
	kill := func(when string, wait func()) {
		e.writeFile("org.yaml", batch(cur, round))
		done := make(chan int, 1)
		go func() { code, _, _ := e.run(e.admin(ks, "apply", "org.yaml")...); done <- code }()
		wait()
		ks.kill9()
		code := <-done
		ks = start(e)
		cur = e.ok(e.admin(ks, "export")...)
		in := applied(cur, round)
		if code == 0 && !in {
			t.Fatalf("round %d: apply said it was done, but the registry does not have it after the kill", round)
		}
		outcomes[in]++
		t.Logf("round %d: killed %s (CLI exit %d): applied %v", round, when, code, in)
		if !in {
			lost = round
		}
		round++
	}
	for _, frac := range []float64{0.05, 0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.3, 1.6, 2.0} {
		d := time.Duration(frac * float64(took))
		kill(fmt.Sprintf("%v into the key server's part", d.Round(time.Millisecond)), func() { time.Sleep(base + d) })
	}
	if audit := filepath.Join(e.dir, "audit.log"); fileExists(audit) {
		// bbolt: the change's audit entry is written before its commit;
		// a kill the moment it shows lands in between, or just after.
		for k := 0; k < 3; k++ {
			kill("as its audit entry appeared", func() { awaitInFile(t, audit, fmt.Sprintf("pair: 3-%d}", 100+round)) })
		}
	}
	t.Logf("after a kill: %d applied wholly, %d not at all, none in part", outcomes[true], outcomes[false])
	if audit := filepath.Join(e.dir, "audit.log"); fileExists(audit) && lost >= 0 {
		// The audit log verifies, and tells that the lost apply's
		// assertion was never kept, though its entry is in the log.
		ks.stop()
		if out := e.ok("audit", "verify", "audit.log", "--store", "ks.db", "--kek-file", "kek"); !strings.HasPrefix(out, "OK") {
			t.Fatalf("audit verify after the kills: %s", out)
		}
		out := e.ok("audit", "readers", "--never", "--reader", "role:gateway", "--pair", fmt.Sprintf("3-%d", 100+lost), "audit.log", "--store", "ks.db", "--kek-file", "kek")
		if !strings.Contains(out, "kept: never, in this log") {
			t.Fatalf("the assertion of round %d, whose apply the kill lost:\n%s", lost, out)
		}
		ks = start(e)
	}
	// The audit log verifies, and says the registry holds the assertions.
	if out := e.ok(e.admin(ks, "assert", "check")...); !strings.Contains(out, "every assertion holds") {
		t.Fatalf("assert check after the kills:\n%s", out)
	}
}

// writeFile writes a file into the env's directory.
func (e *env) writeFile(name, body string) {
	e.t.Helper()
	if err := os.WriteFile(filepath.Join(e.dir, name), []byte(body), 0o600); err != nil {
		e.t.Fatal(err)
	}
}

// fileExists reports whether path names an existing file.
func fileExists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

// awaitInFile returns as soon as text is in the part of the file written
// after the call (polled every half millisecond, for at most 30 s).
func awaitInFile(t *testing.T, path, text string) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.Seek(0, io.SeekEnd); err != nil {
		t.Fatal(err)
	}
	var seen []byte
	buf := make([]byte, 1<<16)
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); {
		n, _ := f.Read(buf)
		if n == 0 {
			time.Sleep(500 * time.Microsecond)
			continue
		}
		seen = append(seen, buf[:n]...)
		if bytes.Contains(seen, []byte(text)) {
			return
		}
	}
	t.Fatalf("%q never appeared in %s", text, path)
}
