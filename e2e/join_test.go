package e2e

import (
	"bytes"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
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
	e, ks := issuingKeyserver(t, false)
	e.webAndDB(ks)
	fp := e.caFingerprint("ca")
	token := func(args ...string) string {
		out := e.ok(e.admin(ks, append([]string{"token", "create"}, args...)...)...)
		m := regexp.MustCompile(`token: (enclave-join-\S+)`).FindStringSubmatch(out)
		if m == nil || !strings.Contains(out, "printf '%s\\n' "+m[1]+" | enclave join --keyserver "+ks.addr+" --token-file - --ca-fingerprint "+fp) {
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
	if code, _, stderr := e.run("join", "--keyserver", ks.addr, "--token-file", "web2.token", "--token", web2, "--ca-fingerprint", fp, "--dir", "web2"); code != 2 || !strings.Contains(stderr, "give the token once") {
		t.Fatalf("both --token-file and --token: %d %s", code, stderr)
	}
	if out := e.ok("join", "--keyserver", ks.addr, "--token-file", "web2.token", "--ca-fingerprint", fp, "--dir", "web2"); !strings.Contains(out, "joined as spiffe://example.org/enclave/3/server/web2") {
		t.Fatalf("join: %s", out)
	}
	// The token on standard input, with the key service down when join
	// starts: join waits for it (--timeout), as it says.
	ks.stop()
	join := exec.Command(binary, "join", "--keyserver", ks.addr, "--token-file", "-", "--ca-fingerprint", fp, "--dir", "phone", "--timeout", "60s")
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
	if code, _, stderr := e.run("join", "--keyserver", ks.addr, "--token", web2, "--ca-fingerprint", fp, "--dir", "again"); code == 0 || !strings.Contains(stderr, "no such join token") {
		t.Fatalf("a token used twice: %d %s", code, stderr)
	}
	if list := e.ok(e.admin(ks, "device", "list")...); !regexp.MustCompile(`(?m)^web2\s+server\s+3\s+302\s+100.64.3.3\/16\s+active`).MatchString(list) {
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
	// device list: when each was last seen, its certificate's expiry and
	// a server's endpoints (issue 32).
	list := e.ok(e.admin(ks, "device", "list")...)
	if !regexp.MustCompile(fmt.Sprintf(`(?m)^web2\s.*active\s+\S+ ago\s+\d{4}-\d\d-\d\d\s+127\.0\.0\.1:%d\s`, serverPort)).MatchString(list) {
		t.Fatalf("device list after web2 ran:\n%s", list)
	}
}

// TestJoinCannotBrickAName (issue 32, blocker 4 and item 3): a join whose
// answer the host could not use (here: another device's files in the way)
// leaves the device pending and the token working; the same command,
// run again once the way is clear, finishes the join with the same key
// and confirms it. A pending device whose token ran out gets a new one
// from an admin. Before, the first failure burnt the token and left the
// name registered and active for good.
func TestJoinCannotBrickAName(t *testing.T) {
	e, ks := issuingKeyserver(t, false)
	e.ok(e.admin(ks, "enclave", "add", "--id", "7", "--name", "db")...)
	fp := e.caFingerprint("ca")
	out := e.ok(e.admin(ks, "token", "create", "--name", "desk", "--role", "client", "--enclave", "7", "--ip", "100.64.7.5/16")...)
	token := regexp.MustCompile(`token: (enclave-join-\S+)`).FindStringSubmatch(out)[1]
	os.WriteFile(e.dir+"/desk.token", []byte(token+"\n"), 0o600)
	state := func() string {
		list := e.ok(e.admin(ks, "device", "list")...)
		m := regexp.MustCompile(`(?m)^desk\s+client\s+7\s+-\s+\S+\s+(\S+)`).FindStringSubmatch(list)
		if m == nil {
			return "absent"
		}
		return m[1]
	}

	// Another device's files where the join writes: it refuses to write
	// them over, and the device stays pending.
	os.MkdirAll(e.dir+"/desk", 0o755)
	os.WriteFile(e.dir+"/desk/desk.crt", []byte("someone else's\n"), 0o644)
	join := []string{"join", "--keyserver", ks.addr, "--token-file", "desk.token", "--ca-fingerprint", fp, "--dir", "desk"}
	if code, _, stderr := e.run(join...); code == 0 || !strings.Contains(stderr, "refusing to overwrite") || !strings.Contains(stderr, "works again with the same token") {
		t.Fatalf("a join into another device's files: %d %s", code, stderr)
	}
	if s := state(); s != "pending" {
		t.Fatalf("after a join the host could not finish, desk is %s, want pending", s)
	}
	// The way cleared, the same command finishes it.
	os.Remove(e.dir + "/desk/desk.crt")
	if out := e.ok(join...); !strings.Contains(out, "joined as spiffe://example.org/enclave/7/client/desk") {
		t.Fatalf("the join again: %s", out)
	}
	if s := state(); s != "active" {
		t.Fatalf("after the join was confirmed, desk is %s", s)
	}
	if left, _ := filepath.Glob(e.dir + "/desk/.join-*"); len(left) != 0 {
		t.Fatalf("the join's key left behind: %v", left)
	}
	if code, _, stderr := e.run(append(join[:len(join)-1], "desk2")...); code == 0 || !strings.Contains(stderr, "no such join token") {
		t.Fatalf("the token after its join was confirmed: %d %s", code, stderr)
	}

	// A join abandoned after the key service answered (its host lost
	// everything): the device stays pending, and an admin's new token
	// for the name enrolls a new host under it.
	out = e.ok(e.admin(ks, "token", "create", "--name", "kiosk", "--role", "client", "--enclave", "7", "--ip", "100.64.7.6/16")...)
	first := regexp.MustCompile(`token: (enclave-join-\S+)`).FindStringSubmatch(out)[1]
	os.MkdirAll(e.dir+"/kiosk", 0o755)
	os.WriteFile(e.dir+"/kiosk/kiosk.key", []byte("in the way\n"), 0o600)
	if code, _, _ := e.run("join", "--keyserver", ks.addr, "--token", first, "--ca-fingerprint", fp, "--dir", "kiosk"); code == 0 {
		t.Fatal("the join into a blocked directory succeeded")
	}
	os.RemoveAll(e.dir + "/kiosk") // the host is lost, its key with it
	out = e.ok(e.admin(ks, "token", "create", "--name", "kiosk", "--role", "client", "--enclave", "7", "--ip", "100.64.7.6/16")...)
	second := regexp.MustCompile(`token: (enclave-join-\S+)`).FindStringSubmatch(out)[1]
	if out := e.ok("join", "--keyserver", ks.addr, "--token", second, "--ca-fingerprint", fp, "--dir", "kiosk"); !strings.Contains(out, "joined as spiffe://example.org/enclave/7/client/kiosk") {
		t.Fatalf("a new token for the pending device: %s", out)
	}
	if code, _, stderr := e.run("join", "--keyserver", ks.addr, "--token", first, "--ca-fingerprint", fp, "--dir", "kiosk-old"); code == 0 || !strings.Contains(stderr, "no such join token") {
		t.Fatalf("the first token after a new one was made: %d %s", code, stderr)
	}
}

// issuingKeyserver is an env with pairCerts' certificates and a key server
// with an issuing CA (issuer/ks.*), which joining hosts get their
// certificates from; withCurl skips the test where curl is missing.
func issuingKeyserver(t *testing.T, withCurl bool) (*env, *keyserver) {
	t.Helper()
	if _, err := exec.LookPath("curl"); err != nil && withCurl {
		t.Skip("curl is not installed (apt-get install curl); .ci/run installs it")
	}
	e := newEnv(t)
	e.pairCerts()
	e.ok("ca", "issuer", "--ca", "ca", "--name", "ks", "--out", "issuer")
	return e, e.start("--issuer-cert", "issuer/ks.crt", "--issuer-key", "issuer/ks.key")
}

// TestAddressesHandedOut (issue 32, item 4): an enclave with a block
// hands its agents overlay addresses: a token without --ip gets the next
// free one, the joined certificate carries it, device list shows it, and
// an address held already is refused when given by hand.
func TestAddressesHandedOut(t *testing.T) {
	e, ks := issuingKeyserver(t, false)
	if out := e.ok(e.admin(ks, "enclave", "add", "--id", "7", "--name", "desks", "--addresses", "100.64.7.0/24", "--network", "100.64.0.0/16")...); !strings.Contains(out, "addresses handed out from 100.64.7.0/24") {
		t.Fatalf("enclave add with a block: %s", out)
	}
	e.ok(e.admin(ks, "enclave", "add", "--id", "3", "--name", "web")...)
	e.ok(e.admin(ks, "enclave", "addresses", "--id", "3", "--addresses", "100.64.3.0/24", "--network", "100.64.0.0/16")...)
	fp := e.caFingerprint("ca")
	for i, name := range []string{"desk1", "desk2"} {
		out := e.ok(e.admin(ks, "token", "create", "--name", name, "--role", "client", "--enclave", "7")...)
		want := fmt.Sprintf("100.64.7.%d/16", i+1)
		if !strings.Contains(out, "its overlay address: "+want) {
			t.Fatalf("token for %s: %s", name, out)
		}
		token := regexp.MustCompile(`token: (enclave-join-\S+)`).FindStringSubmatch(out)[1]
		e.ok("join", "--keyserver", ks.addr, "--token", token, "--ca-fingerprint", fp, "--dir", name)
		if show := e.ok("cert", "show", name+"/"+name+".crt"); !strings.Contains(show, want) {
			t.Fatalf("%s's certificate does not carry %s:\n%s", name, want, show)
		}
	}
	out := e.ok(e.admin(ks, "device", "add", "--name", "web9", "--role", "server", "--enclave", "3", "--server-id", "9")...)
	if !strings.Contains(out, "overlay address 100.64.3.1/16 (its certificate must carry it: --ip 100.64.3.1/16)") {
		t.Fatalf("device add in an enclave with a block: %s", out)
	}
	if code, _, stderr := e.run(e.admin(ks, "device", "add", "--name", "web10", "--role", "server", "--enclave", "3", "--server-id", "10", "--ip", "100.64.7.2/16")...); code == 0 || !strings.Contains(stderr, "overlay address 100.64.7.2 is desk2") {
		t.Fatalf("an address held already, given by hand: %d %s", code, stderr)
	}
	if list := e.ok(e.admin(ks, "device", "list")...); !regexp.MustCompile(`(?m)^desk2\s+client\s+7\s+-\s+100\.64\.7\.2/16\s+active`).MatchString(list) {
		t.Fatalf("device list:\n%s", list)
	}
}

// caFingerprint is the fingerprint enclave ca show prints for the CA in
// dir, which joining hosts pin.
func (e *env) caFingerprint(dir string) string {
	e.t.Helper()
	m := regexp.MustCompile(`fingerprint: (sha256:[0-9a-f]{64})`).FindStringSubmatch(e.ok("ca", "show", "--ca", dir))
	if m == nil {
		e.t.Fatal("ca show printed no fingerprint")
	}
	return m[1]
}

// webAndDB registers enclaves 3 (web) and 7 (db) and allows their pair.
func (e *env) webAndDB(ks *keyserver) {
	e.t.Helper()
	e.ok(e.admin(ks, "enclave", "add", "--id", "3", "--name", "web")...)
	e.ok(e.admin(ks, "enclave", "add", "--id", "7", "--name", "db")...)
	e.ok(e.admin(ks, "pair", "allow", "3-7")...)
}
