package e2e

import (
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestRenewWithKeyService (issue 32, item 2): joined hosts renew without
// the CA's key. enclave cert renew --keyserver writes a new pair for the
// same identity (a key made on the host) in place of the old; a server
// and a client agent renew themselves (--renew-before longer than the
// certificate's life: at once) into --renew-dir, put the new pair in
// force without a restart while a page is fetched through their SA the
// whole time, and status says when; restarted, the client starts from
// the renewed pair.
func TestRenewWithKeyService(t *testing.T) {
	e, ks := issuingKeyserver(t, true)
	e.webAndDB(ks)
	fp := e.caFingerprint("ca")
	join := func(name string, args ...string) {
		out := e.ok(e.admin(ks, append([]string{"token", "create", "--name", name}, args...)...)...)
		token := regexp.MustCompile(`token: (enclave-join-\S+)`).FindStringSubmatch(out)[1]
		e.ok("join", "--keyserver", ks.addr, "--token", token, "--ca-fingerprint", fp, "--dir", name)
	}
	join("web2", "--role", "server", "--enclave", "3", "--server-id", "302", "--ip", "100.64.3.3/16")
	join("phone", "--role", "client", "--enclave", "7", "--ip", "100.64.7.9/16")

	// By hand, on the host: a new key, the same identity, the old pair kept.
	before, _ := os.ReadFile(filepath.Join(e.dir, "phone", "phone.key"))
	out := e.ok("cert", "renew", "--keyserver", ks.addr, "--ca", "phone/ca.crt", "--cert", "phone/phone.crt", "--key", "phone/phone.key")
	if !strings.Contains(out, "renewed spiffe://example.org/enclave/7/client/phone") {
		t.Fatalf("cert renew --keyserver: %s", out)
	}
	after, _ := os.ReadFile(filepath.Join(e.dir, "phone", "phone.key"))
	old, _ := os.ReadFile(filepath.Join(e.dir, "phone", "phone.key.old"))
	if string(after) == string(before) || string(old) != string(before) {
		t.Fatal("cert renew --keyserver did not put a new key in place of the old one, kept as .old")
	}

	// Self-renewal under traffic.
	web := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { fmt.Fprint(w, "hello from web1") })}
	wl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go web.Serve(wl)
	t.Cleanup(func() { web.Close() })
	serverPort, socks := freePortPair(t), freeTCP(t)
	renew := []string{"--renew-before", "2400h"} // longer than the 90 days: due at once
	server := e.spawn(append([]string{"agent", "--ca", "web2/ca.crt", "--cert", "web2/web2.crt", "--key", "web2/web2.key", "--keyserver", ks.addr,
		"--listen", fmt.Sprintf("127.0.0.1:%d", serverPort), "--netstack", "--expose", "80=" + wl.Addr().String(), "--status-socket", "off",
		"--renew-dir", "web2/renewed"}, renew...)...)
	clientArgs := []string{"agent", "--ca", "phone/ca.crt", "--cert", "phone/phone.crt", "--key", "phone/phone.key", "--keyserver", ks.addr,
		"--listen", fmt.Sprintf("127.0.0.1:%d", freePortPair(t)), "--netstack", "--socks5", socks, "--status-socket", "phone.sock",
		"--peer", fmt.Sprintf("100.64.3.0/24=127.0.0.1:%d", serverPort), "--renew-dir", "phone/renewed"}
	// The client first without renewal, so that its SA is up before.
	client := e.spawn(append(clientArgs, "--renew-before", "off")...)
	e.curlPage(socks, "http://100.64.3.3/")

	stopFetching := fetchLoop(t, socks, "http://100.64.3.3/")
	server.waitLog(t, `"msg":"certificate renewed"`, 20*time.Second)
	if _, err := os.Stat(filepath.Join(e.dir, "web2", "renewed", "web2.key")); err != nil {
		t.Fatalf("the server's renewed key: %v", err)
	}
	time.Sleep(time.Second) // traffic across the server's new credentials
	if ok, failed := stopFetching(); failed != 0 || ok < 3 {
		t.Fatalf("traffic across the renewal: %d fetched, %d failed", ok, failed)
	}
	// The server's directory entry, which carries its certificate, is
	// registered again with the renewed one at once.
	log := server.log.String()
	if i := strings.Index(log, `"msg":"certificate renewed"`); i < 0 || !strings.Contains(log[i:], `"msg":"directory: endpoints registered"`) {
		t.Fatalf("the server did not register its entry again after the renewal:\n%s", log)
	}
	// By hand on top (the rollover's step for joined hosts): the pair in
	// force, in --renew-dir, renewed over another connection, then SIGHUP.
	// The key service pins the new certificate; the agent's connection,
	// made with the one before the pair in force, is made again with the
	// new one (operator review: it was refused, "pins another
	// certificate", and the directory entry went stale).
	e.ok("cert", "renew", "--keyserver", ks.addr, "--ca", "web2/ca.crt", "--cert", "web2/renewed/web2.crt", "--key", "web2/renewed/web2.key")
	mark := len(server.log.String())
	server.cmd.Process.Signal(syscall.SIGHUP)
	deadline := time.Now().Add(15 * time.Second)
	for !strings.Contains(server.log.String()[mark:], `"msg":"directory: endpoints registered"`) {
		if time.Now().After(deadline) {
			t.Fatalf("the server did not register its entry with its hand-renewed certificate:\n%s", server.log.String()[mark:])
		}
		time.Sleep(50 * time.Millisecond)
	}
	if strings.Contains(server.log.String()[mark:], "pins another certificate") {
		t.Fatalf("the server's key-service connection kept a certificate the pin no longer takes:\n%s", server.log.String()[mark:])
	}
	e.curlPage(socks, "http://100.64.3.3/")
	// A --renew-before longer than the certificates' life renews once,
	// not again and again.
	if n := strings.Count(server.log.String(), `"msg":"certificate renewed"`); n != 1 {
		t.Fatalf("the server renewed %d times, want once:\n%s", n, server.log)
	}

	// The client, restarted with self-renewal: it renews into its
	// directory, and status says so; restarted again, it starts from the
	// renewed pair.
	client.kill9()
	client = e.spawn(append(clientArgs, renew...)...)
	client.waitLog(t, `"msg":"certificate renewed"`, 20*time.Second)
	var st struct {
		Renewal struct {
			State, Files string
			Last         time.Time
		} `json:"renewal"`
	}
	if err := json.Unmarshal([]byte(e.ok("status", "--socket", "phone.sock", "--json")), &st); err != nil {
		t.Fatal(err)
	}
	if st.Renewal.Last.IsZero() || !strings.HasSuffix(st.Renewal.Files, "phone/renewed/phone.crt") {
		t.Fatalf("status after the renewal: %+v", st.Renewal)
	}
	if out := e.ok("status", "--socket", "phone.sock"); !strings.Contains(out, "renewal: ") || !strings.Contains(out, "last renewed") {
		t.Fatalf("status says nothing of the renewal:\n%s", out)
	}
	client.kill9()
	client = e.spawn(append(clientArgs, "--renew-before", "off")...)
	client.waitLog(t, "starting with the renewed certificate", 10*time.Second)
	e.curlPage(socks, "http://100.64.3.3/")
}

// TestKeyserverRenewsItself (issue 32, item 2): a key server with an
// issuing CA renews its own certificate with it (here at once: a
// --renew-before longer than the certificate's life), audited, puts it in
// force without a restart (admins reach it through the new one), and
// starts from it again.
func TestKeyserverRenewsItself(t *testing.T) {
	e, ks := issuingKeyserver(t, false)
	ks.stop()
	ks = e.start("--issuer-cert", "issuer/ks.crt", "--issuer-key", "issuer/ks.key", "--listen", ks.addr, "--renew-before", "100000h", "--renew-dir", "renewed")
	deadline := time.Now().Add(15 * time.Second)
	for !strings.Contains(ks.stderr.String(), `"msg":"certificate renewed"`) {
		if time.Now().After(deadline) {
			t.Fatalf("the key server did not renew itself:\n%s", ks.stderr)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if _, err := os.Stat(filepath.Join(e.dir, "renewed", "ks.crt")); err != nil {
		t.Fatal(err)
	}
	e.ok(e.admin(ks, "status")...)
	if b, _ := os.ReadFile(filepath.Join(e.dir, "audit.log")); !strings.Contains(string(b), "renewed its own certificate") {
		t.Fatal("the renewal is not in the audit log")
	}
	ks.stop()
	ks = e.start("--issuer-cert", "issuer/ks.crt", "--issuer-key", "issuer/ks.key", "--listen", ks.addr, "--renew-before", "off", "--renew-dir", "renewed")
	if !strings.Contains(ks.stderr.String(), "starting with the renewed certificate") {
		t.Fatalf("the restarted key server did not start from its renewed certificate:\n%s", ks.stderr)
	}
	e.ok(e.admin(ks, "status")...)
}
