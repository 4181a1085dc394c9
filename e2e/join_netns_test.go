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
	fp = e.caFingerprint("ca")
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

// TestTwoHostsGuide (issue 32, item 6): docs/OPERATIONS.md's "Two hosts",
// command for command (a router's namespace stands for host A's key
// server, hosts A and B for the two agents): org init, the key server,
// two enclaves with address blocks, a pair, two tokens, join --run on
// each host, and a ping, with the admin context org init wrote and no
// connection flags. Ten commands from nothing.
func TestTwoHostsGuide(t *testing.T) {
	needNetns(t)
	e := newEnv(t)
	tp := newTopology(t)
	t.Setenv("XDG_CONFIG_HOME", filepath.Join(e.dir, "xdg")) // org init's default admin context goes here
	t.Setenv("ENCLAVE_CONTEXT", "")
	run := func(args ...string) string {
		t.Helper()
		return tp.inDir(tp.r, e.dir, append([]string{binary}, args...)...)
	}
	out := run("org", "init", "org", "--keyserver-host", "10.98.2.1", "--org", "example.org") // 1
	if !strings.Contains(out, "enclave admin status needs no flags") {
		t.Fatalf("org init:\n%s", out)
	}
	tp.spawn("keyserver", tp.r, e.dir, binary, "keyserver", "--ca", "org/bundle.crt", "--cert", "org/certs/ks1.crt", "--key", "org/certs/ks1.key", // 2
		"--kek-file", "org/kek", "--issuer-cert", "org/issuer/ks1.crt", "--issuer-key", "org/issuer/ks1.key", "--store", "ks.db", "--audit", "audit.log", "--listen", "0.0.0.0:7443")
	tp.waitLog("keyserver", regexp.MustCompile(`key service listening`))
	run("admin", "enclave", "add", "--id", "3", "--name", "web", "--addresses", "100.64.3.0/24", "--network", "100.64.0.0/16")     // 3
	run("admin", "enclave", "add", "--id", "7", "--name", "laptops", "--addresses", "100.64.7.0/24", "--network", "100.64.0.0/16") // 4
	run("admin", "pair", "allow", "3-7")                                                                                           // 5
	joinLine := func(out string) string {
		t.Helper()
		m := regexp.MustCompile(`(?m)^  (printf .* --dir /etc/enclave)$`).FindStringSubmatch(out)
		if m == nil {
			t.Fatalf("token create printed no join line:\n%s", out)
		}
		return m[1]
	}
	web1 := joinLine(run("admin", "token", "create", "--name", "web1", "--role", "server", "--enclave", "3", "--server-id", "1")) // 6
	laptop := joinLine(run("admin", "token", "create", "--name", "laptop", "--role", "client", "--enclave", "7"))                 // 7
	// Each host's directory stands for its /etc/enclave. The token goes
	// in from a file rather than printf's pipe, so that the process the
	// test stops is the agent join became.
	host := func(name, ns, line string) {
		m := regexp.MustCompile(`^printf '%s\\n' (\S+) \| enclave join (.*) --token-file - (.*) --dir /etc/enclave$`).FindStringSubmatch(line)
		if m == nil {
			t.Fatalf("the join line: %s", line)
		}
		tok := filepath.Join(e.dir, name+".token")
		if err := os.WriteFile(tok, []byte(m[1]+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		args := append([]string{binary, "join"}, strings.Fields(m[2])...)
		args = append(args, "--token-file", tok)
		args = append(args, strings.Fields(m[3])...)
		tp.spawn(name, ns, e.dir, append(args, "--dir", name, "--run")...)
	}
	host("web1", tp.b, web1)     // 8
	host("laptop", tp.a, laptop) // 9
	tp.waitLog("web1", regexp.MustCompile(`agent listening`))
	tp.waitLog("laptop", regexp.MustCompile(`agent listening`))
	deadline := time.Now().Add(20 * time.Second)
	for { // 10
		out, err := exec.Command("ip", "netns", "exec", tp.a, "ping", "-c", "1", "-W", "2", "100.64.3.1").CombinedOutput()
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("ping 100.64.3.1 from the laptop:\n%s", out)
		}
	}
}
