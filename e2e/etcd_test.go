package e2e

import (
	"os"
	"strings"
	"testing"

	"github.com/enclavekeys/enclave/internal/etcdtest"
)

// TestEtcdReplicaProcesses: two key-server processes on one etcd serve one
// organisation: an admin write through the first is served by the second,
// and the audit log in etcd verifies.
func TestEtcdReplicaProcesses(t *testing.T) {
	cluster := etcdtest.Start(t, 1)
	etcd := strings.Join(cluster.Endpoints, ",")
	e := newEnv(t)
	e.issue("ks", "keyserver", "--host", "127.0.0.1")
	e.issue("alice", "admin")
	e.issue("web1", "server", "--enclave", "3", "--server-id", "258")
	e.ok("keys", "generate", "--out", "kek")
	os.Chmod(e.dir+"/kek", 0o600)
	a := e.startWith("--etcd", etcd)
	b := e.startWith("--etcd", etcd)
	admin := []string{"admin", "--keyserver", a.addr, "--ca", "ca/ca.crt", "--cert", "certs/alice.crt", "--key", "certs/alice.key"}
	e.ok(append(admin, "enclave", "add", "--id", "3", "--name", "web")...)
	e.ok(append(admin, "device", "add", "--name", "web1", "--role", "server", "--enclave", "3", "--server-id", "258")...)
	e.ok(append(admin, "pair", "allow", "3", "3")...)
	out := e.ok("keys", "fetch", "--keyserver", b.addr, "--ca", "ca/ca.crt", "--cert", "certs/web1.crt", "--key", "certs/web1.key")
	if !strings.Contains(out, "SK(3,3,258,1)") {
		t.Fatalf("replica B: %s", out)
	}
	if out := e.ok("audit", "verify", "--etcd", etcd, "--kek-file", "kek"); !strings.HasPrefix(out, "OK: ") {
		t.Fatalf("etcd audit: %s", out)
	}
	// A wrong KEK cannot start a replica: the registry's MAC does not match.
	e.ok("keys", "generate", "--out", "kek2")
	os.Chmod(e.dir+"/kek2", 0o600)
	code, _, errs := e.run("keyserver", "--ca", "ca/ca.crt", "--cert", "certs/ks.crt", "--key", "certs/ks.key", "--kek-file", "kek2", "--etcd", etcd, "--listen", "127.0.0.1:0", "--metrics-listen", "")
	if code != 1 || !strings.Contains(errs, "a different KEK") {
		t.Fatalf("wrong KEK: %d %s", code, errs)
	}
}
