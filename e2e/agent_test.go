package e2e

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// TestAgentsCurl: a key server, a server agent exposing a local HTTP
// server on its overlay address, a client agent with a SOCKS5 proxy, all
// real processes on loopback; curl fetches the page through the SA.
func TestAgentsCurl(t *testing.T) {
	if _, err := exec.LookPath("curl"); err != nil {
		t.Skip("curl is not installed (apt-get install curl); .ci/run installs it")
	}
	e := newEnv(t)
	ks := e.pairOrg()

	socks, _ := e.webAgents(ks.addr)
	var out []byte
	var err error
	for i := 0; i < 50; i++ {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		out, err = exec.CommandContext(ctx, "curl", "-sS", "--max-time", "8", "--socks5", socks, "http://100.64.3.1/").CombinedOutput()
		cancel()
		if err == nil {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	if err != nil || !strings.Contains(string(out), "hello from web1") {
		t.Fatalf("curl --socks5: %v: %s", err, out)
	}
}

// pairOrg is the README's organisation: a key server (running), an
// admin, enclaves 3 and 7 with pair 3-7 allowed, server web1 (3, 258,
// 100.64.3.1) and client laptop (7, 100.64.7.1), all registered.
func (e *env) pairOrg() *keyserver {
	e.t.Helper()
	e.pairCerts()
	ks := e.start()
	e.pairRegister(ks)
	return ks
}

// pairCerts issues pairOrg's certificates and makes its KEK.
func (e *env) pairCerts() {
	e.t.Helper()
	e.issue("ks", "keyserver", "--host", "127.0.0.1")
	e.issue("alice", "admin")
	e.issue("web1", "server", "--enclave", "3", "--server-id", "258", "--ip", "100.64.3.1/16")
	e.issue("laptop", "client", "--enclave", "7", "--ip", "100.64.7.1/16")
	e.ok("keys", "generate", "--out", "kek")
	os.Chmod(e.dir+"/kek", 0o600)
}

// pairRegister registers pairOrg's enclaves, devices and pair through ks.
func (e *env) pairRegister(ks *keyserver) {
	e.t.Helper()
	e.ok(e.admin(ks, "enclave", "add", "--id", "3", "--name", "web")...)
	e.ok(e.admin(ks, "enclave", "add", "--id", "7", "--name", "db")...)
	e.ok(e.admin(ks, "device", "add", "--name", "web1", "--role", "server", "--enclave", "3", "--server-id", "258")...)
	e.ok(e.admin(ks, "device", "add", "--name", "laptop", "--role", "client", "--enclave", "7")...)
	e.ok(e.admin(ks, "pair", "allow", "3-7")...)
}

// webAgents serves "hello from web1" on a local HTTP server, exposed on
// port 80 of a server agent web1 (100.64.3.1, keys from keyservers), and
// starts a client agent laptop routed to it with a SOCKS5 proxy. It
// returns the proxy's address and the server agent.
func (e *env) webAgents(keyservers string, serverArgs ...string) (socks string, server *process) {
	e.t.Helper()
	web := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { fmt.Fprint(w, "hello from web1") })}
	wl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		e.t.Fatal(err)
	}
	go web.Serve(wl)
	e.t.Cleanup(func() { web.Close() })
	serverPort, clientPort := freePortPair(e.t), freePortPair(e.t)
	socks = freeTCP(e.t)
	server = e.spawn(append([]string{"agent", "--ca", "ca/ca.crt", "--cert", "certs/web1.crt", "--key", "certs/web1.key", "--keyserver", keyservers,
		"--listen", fmt.Sprintf("127.0.0.1:%d", serverPort), "--netstack", "--expose", "80=" + wl.Addr().String()}, serverArgs...)...)
	e.spawn("agent", "--ca", "ca/ca.crt", "--cert", "certs/laptop.crt", "--key", "certs/laptop.key",
		"--listen", fmt.Sprintf("127.0.0.1:%d", clientPort), "--netstack", "--socks5", socks,
		"--peer", fmt.Sprintf("100.64.3.0/24=127.0.0.1:%d", serverPort))
	return socks, server
}

// admin is the command line of enclave admin against ks as alice.
func (e *env) admin(ks *keyserver, args ...string) []string {
	return append([]string{"admin", "--keyserver", ks.addr, "--ca", "ca/ca.crt", "--cert", "certs/alice.crt", "--key", "certs/alice.key"}, args...)
}

// freePortPair finds a UDP port whose next port is free too (an agent's
// data and control ports).
func freePortPair(t *testing.T) int {
	t.Helper()
	for i := 0; i < 100; i++ {
		a, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			t.Fatal(err)
		}
		p := a.LocalAddr().(*net.UDPAddr).Port
		b, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: p + 1})
		a.Close()
		if err == nil {
			b.Close()
			return p
		}
	}
	t.Fatal("no free port pair")
	return 0
}

// freeTCP is a free loopback TCP address.
func freeTCP(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}
