package e2e

import (
	"bytes"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"testing"
	"time"
)

// TestJoin (issue 22): hosts enroll with a token and the CA fingerprint
// alone: the key service's issuing CA signs keys made on the hosts; a
// server and a client that joined so reach each other, the client finding
// the server in the endpoint directory (no --peer); a token works once; a
// wrong fingerprint is refused before the token is sent.
func TestJoin(t *testing.T) {
	e := newEnv(t)
	e.pairCerts()
	e.ok("ca", "issuer", "--ca", "ca", "--name", "ks", "--out", "issuer")
	ks := e.start("--issuer-cert", "issuer/ks.crt", "--issuer-key", "issuer/ks.key")
	e.ok(e.admin(ks, "enclave", "add", "--id", "3", "--name", "web")...)
	e.ok(e.admin(ks, "enclave", "add", "--id", "7", "--name", "db")...)
	e.ok(e.admin(ks, "pair", "allow", "3-7")...)
	fp := regexp.MustCompile(`fingerprint: (sha256:[0-9a-f]{64})`).FindStringSubmatch(e.ok("ca", "show", "--ca", "ca"))
	if fp == nil {
		t.Fatal("ca show printed no fingerprint")
	}
	token := func(args ...string) string {
		out := e.ok(e.admin(ks, append([]string{"token", "create"}, args...)...)...)
		m := regexp.MustCompile(`token: (enclave-join-\S+)`).FindStringSubmatch(out)
		if m == nil || !strings.Contains(out, "printf '%s\\n' "+m[1]+" | enclave join --keyserver "+ks.addr+" --token-file - --ca-fingerprint "+fp[1]) {
			t.Fatalf("token create:\n%s", out)
		}
		return m[1]
	}
	web2 := token("--name", "web2", "--role", "server", "--enclave", "3", "--server-id", "302", "--ip", "100.64.3.3/16")
	phone := token("--name", "phone", "--role", "client", "--enclave", "7", "--ip", "100.64.7.9/16", "--ttl", "15m")

	// A wrong fingerprint: refused before anything is sent, at once
	// (not waited on as an unreachable key service is).
	wrong := "sha256:" + strings.Repeat("0", 64)
	began := time.Now()
	if code, _, stderr := e.run("join", "--keyserver", ks.addr, "--token", web2, "--ca-fingerprint", wrong, "--dir", "web2"); code == 0 || !strings.Contains(stderr, "does not serve the CA") {
		t.Fatalf("a wrong fingerprint: %d %s", code, stderr)
	} else if time.Since(began) > 15*time.Second {
		t.Fatalf("a wrong fingerprint was retried until --timeout: %s", stderr)
	}
	// The token from a file (never on the command line).
	os.WriteFile(e.dir+"/web2.token", []byte(web2+"\n"), 0o600)
	if code, _, stderr := e.run("join", "--keyserver", ks.addr, "--token-file", "web2.token", "--token", web2, "--ca-fingerprint", fp[1], "--dir", "web2"); code != 2 || !strings.Contains(stderr, "give the token once") {
		t.Fatalf("both --token-file and --token: %d %s", code, stderr)
	}
	if out := e.ok("join", "--keyserver", ks.addr, "--token-file", "web2.token", "--ca-fingerprint", fp[1], "--dir", "web2"); !strings.Contains(out, "joined as spiffe://example.org/enclave/3/server/web2") {
		t.Fatalf("join: %s", out)
	}
	// The token on standard input, with the key service down when join
	// starts: join waits for it (--timeout), as it says.
	ks.stop()
	join := exec.Command(binary, "join", "--keyserver", ks.addr, "--token-file", "-", "--ca-fingerprint", fp[1], "--dir", "phone", "--timeout", "60s")
	join.Dir, join.Stdin = e.dir, strings.NewReader(phone+"\n")
	var joinOut, joinErr bytes.Buffer
	join.Stdout, join.Stderr = &joinOut, &joinErr
	if err := join.Start(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(1500 * time.Millisecond)
	ks = e.start("--issuer-cert", "issuer/ks.crt", "--issuer-key", "issuer/ks.key", "--listen", ks.addr)
	if err := join.Wait(); err != nil || !strings.Contains(joinOut.String(), "joined as spiffe://example.org/enclave/7/client/phone") ||
		!strings.Contains(joinErr.String(), "waiting for the key service at "+ks.addr) {
		t.Fatalf("join while the key service was down: %v\n%s%s", err, &joinOut, &joinErr)
	}
	if st, err := os.Stat(e.dir + "/web2/web2.key"); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("the key file: %v %v", st, err)
	}
	if code, _, stderr := e.run("join", "--keyserver", ks.addr, "--token", web2, "--ca-fingerprint", fp[1], "--dir", "again"); code == 0 || !strings.Contains(stderr, "no such join token") {
		t.Fatalf("a token used twice: %d %s", code, stderr)
	}
	if list := e.ok(e.admin(ks, "device", "list")...); !regexp.MustCompile(`(?m)^web2\s+server\s+3\s+302\s+active`).MatchString(list) {
		t.Fatalf("web2 is not registered:\n%s", list)
	}

	// The joined hosts talk: web2 serves a page on its overlay address,
	// phone fetches it through its SOCKS5 proxy.
	web := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { fmt.Fprint(w, "hello from web1") })}
	wl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go web.Serve(wl)
	t.Cleanup(func() { web.Close() })
	serverPort, socks := freePortPair(t), freeTCP(t)
	e.spawn("agent", "--ca", "web2/ca.crt", "--cert", "web2/web2.crt", "--key", "web2/web2.key", "--keyserver", ks.addr,
		"--listen", fmt.Sprintf("127.0.0.1:%d", serverPort), "--netstack", "--expose", "80="+wl.Addr().String(), "--status-socket", "off")
	// No --peer: phone finds web2 in the key service's endpoint directory.
	e.spawn("agent", "--ca", "phone/ca.crt", "--cert", "phone/phone.crt", "--key", "phone/phone.key", "--keyserver", ks.addr,
		"--listen", fmt.Sprintf("127.0.0.1:%d", freePortPair(t)), "--netstack", "--socks5", socks, "--status-socket", "off")
	e.curlPage(socks, "http://100.64.3.3/")
}
