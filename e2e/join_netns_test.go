package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// TestJoinNetns (issue 22, part 3): three hosts in network namespaces
// join with exactly the two commands a host runs (enclave join, then the
// agent on a TUN device, with no --peer), given only a token and the CA
// fingerprint; the client reaches both servers by overlay address through
// the endpoint directory; a revoked host's certificate stops working, and
// so does a token made for a host revoked before it joined.
func TestJoinNetns(t *testing.T) {
	needNetns(t)
	e := newEnv(t)
	tp := newTopology(t)
	admin, token, fp := tp.startJoinOrg(e, []string{"pair", "allow", "7-7"})
	hosts := []struct {
		ns, name, listen string
		token            string
	}{
		{tp.b, "web", "10.98.2.2", token("--name", "web", "--role", "server", "--enclave", "3", "--server-id", "401", "--ip", "100.64.3.20/16")},
		{tp.r, "db", "10.98.1.1", token("--name", "db", "--role", "server", "--enclave", "7", "--server-id", "402", "--ip", "100.64.7.30/16")},
		{tp.a, "desk", "10.98.1.2", token("--name", "desk", "--role", "client", "--enclave", "7", "--ip", "100.64.7.20/16")},
	}
	for _, h := range hosts {
		tp.joinHost(e, h.ns, h.name, h.listen, h.token, fp)
	}
	ping := func(dst string) (string, bool) {
		out, err := exec.Command("ip", "netns", "exec", tp.a, "ping", "-c", "3", "-i", "0.3", "-w", "8", dst).CombinedOutput()
		return string(out), err == nil && strings.Contains(string(out), "3 received")
	}
	for _, dst := range []string{"100.64.3.20", "100.64.7.30"} {
		if out, ok := ping(dst); !ok {
			t.Fatalf("desk pinging %s with no --peer:\n%s\n%s", dst, out, tp.logs["desk"])
		}
	}

	// A token for a host revoked before it joins is withdrawn.
	late := token("--name", "late", "--role", "client", "--enclave", "7", "--ip", "100.64.7.40/16")
	tp.inDir(tp.r, e.dir, append(admin, "device", "revoke", "--name", "late")...)
	if out, err := exec.Command("ip", "netns", "exec", tp.a, binary, "join", "--keyserver", "10.98.2.1:7443", "--token", late, "--ca-fingerprint", fp, "--dir", filepath.Join(e.dir, "late")).CombinedOutput(); err == nil {
		t.Fatalf("a withdrawn token joined:\n%s", out)
	}
	// A revoked host's certificate stops working: its SAs end and no new
	// one is granted.
	tp.inDir(tp.r, e.dir, append(admin, "device", "revoke", "--name", "desk")...)
	deadline := time.Now().Add(15 * time.Second)
	for {
		out, err := exec.Command("ip", "netns", "exec", tp.a, "ping", "-c", "1", "-w", "2", "100.64.3.20").CombinedOutput()
		if err != nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the revoked host still reaches web:\n%s", out)
		}
		time.Sleep(500 * time.Millisecond)
	}
	if out, _ := exec.Command("ip", "netns", "exec", tp.a, "ping", "-c", "3", "-i", "0.3", "-w", "4", "100.64.3.20").CombinedOutput(); !strings.Contains(string(out), " 0 received") {
		t.Fatalf("the revoked host reaches web again:\n%s", out)
	}
}

// startJoinOrg starts a key server on the router with an issuing CA (so
// that hosts can join), enclaves 3 (web) and 7 (desks) and pair 3-7, then
// the admin commands more (each a command line after "admin"). It returns
// the admin command, a function making a join token (token create's
// flags) and the CA's fingerprint.
func (tp *topology) startJoinOrg(e *env, more ...[]string) (admin []string, token func(args ...string) string, fp string) {
	tp.t.Helper()
	e.issue("ks", "keyserver", "--host", "10.98.2.1")
	e.issue("alice", "admin")
	e.ok("keys", "generate", "--out", "kek")
	os.Chmod(filepath.Join(e.dir, "kek"), 0o600)
	e.ok("ca", "issuer", "--ca", "ca", "--name", "ks", "--out", "issuer")
	tp.spawn("keyserver", tp.r, e.dir, binary, "keyserver", "--ca", "ca/ca.crt", "--cert", "certs/ks.crt", "--key", "certs/ks.key",
		"--store", "ks.db", "--audit", "audit.log", "--kek-file", "kek", "--listen", "10.98.2.1:7443", "--metrics-listen", "",
		"--issuer-cert", "issuer/ks.crt", "--issuer-key", "issuer/ks.key")
	tp.waitLog("keyserver", regexp.MustCompile(`key service listening`))
	admin = []string{binary, "admin", "--keyserver", "10.98.2.1:7443", "--ca", "ca/ca.crt", "--cert", "certs/alice.crt", "--key", "certs/alice.key"}
	for _, a := range append([][]string{{"enclave", "add", "--id", "3", "--name", "web"}, {"enclave", "add", "--id", "7", "--name", "desks"}, {"pair", "allow", "3-7"}}, more...) {
		tp.inDir(tp.r, e.dir, append(admin, a...)...)
	}
	fp = regexp.MustCompile(`fingerprint: (sha256:[0-9a-f]{64})`).FindStringSubmatch(e.ok("ca", "show", "--ca", "ca"))[1]
	token = func(args ...string) string {
		out := tp.inDir(tp.r, e.dir, append(append(admin, "token", "create"), args...)...)
		return regexp.MustCompile(`token: (enclave-join-\S+)`).FindStringSubmatch(out)[1]
	}
	return admin, token, fp
}

// joinHost runs the two commands of a host in namespace ns: enclave join
// with its token, then the agent on a TUN device listening on listen.
func (tp *topology) joinHost(e *env, ns, name, listen, token, fp string) {
	tp.t.Helper()
	tp.inDir(ns, e.dir, binary, "join", "--keyserver", "10.98.2.1:7443", "--token", token, "--ca-fingerprint", fp, "--dir", name)
	// The settings join wrote (the CA, the key service, the TUN device),
	// with the files it names, as the systemd unit runs them.
	tp.spawn(name, ns, e.dir, binary, "agent", "--config", name+"/agent.yaml", "--cert", name+"/"+name+".crt", "--key", name+"/"+name+".key",
		"--listen", listen, "--status-socket", "off")
	tp.waitLog(name, regexp.MustCompile(`agent listening`))
}
