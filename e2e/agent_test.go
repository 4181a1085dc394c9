package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestAgentsCurl: a key server, a server agent exposing a local HTTP
// server on its overlay address, a client agent with a SOCKS5 proxy, all
// real processes on loopback; curl fetches the page through the SA.
func TestAgentsCurl(t *testing.T) {
	webOrg(t)
}

// webOrg is pairOrg with webAgents running, the page fetched once: it
// returns the environment, the key server, the client's proxy and the
// agents (server, client).
func webOrg(t *testing.T) (*env, *keyserver, string, []*process) {
	t.Helper()
	if _, err := exec.LookPath("curl"); err != nil {
		t.Skip("curl is not installed (apt-get install curl); .ci/run installs it")
	}
	e := newEnv(t)
	ks := e.pairOrg()
	socks, server, client := e.webAgentsWith(ks.addr, nil, nil)
	e.curlWeb1(socks)
	return e, ks, socks, []*process{server, client}
}

// curlWeb1 fetches web1's page through the client's SOCKS5 proxy (trying
// again while the agents come up).
func (e *env) curlWeb1(socks string) {
	e.t.Helper()
	e.curlPage(socks, "http://100.64.3.1/")
}

// curlPage fetches url (web1's page, served by some agent) through the
// SOCKS5 proxy socks, trying again while the agents come up.
func (e *env) curlPage(socks, url string) {
	e.t.Helper()
	var out []byte
	var err error
	for i := 0; i < 50; i++ {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		out, err = exec.CommandContext(ctx, "curl", "-sS", "--max-time", "8", "--socks5", socks, url).CombinedOutput()
		cancel()
		if err == nil {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	if err != nil || !strings.Contains(string(out), "hello from web1") {
		e.t.Fatalf("curl --socks5: %v: %s", err, out)
	}
}

// TestStatus: enclave status asks a running agent over its status
// socket: the server shows its key service connection, its server key
// and the client's SA with the traffic it carried; the client shows the
// same SA from its side; JSON carries the counters; no key is shown; a
// socket nobody answers on says how to start one.
func TestStatus(t *testing.T) {
	if _, err := exec.LookPath("curl"); err != nil {
		t.Skip("curl is not installed (apt-get install curl); .ci/run installs it")
	}
	e := newEnv(t)
	ks := e.pairOrg()
	socks, server, _ := e.webAgentsWith(ks.addr, []string{"--status-socket", "server.sock"}, []string{"--status-socket", "client.sock"})
	e.curlWeb1(socks)

	out := e.ok("status", "--socket", "server.sock")
	for _, want := range []string{"agent web1 (spiffe://example.org/enclave/3/server/web1)", "server, enclave 3, overlay 100.64.3.1",
		"key service " + ks.addr + ": watching (since", "server keys: 3-7 generation 1 (current)", "peer laptop (100.64.7.1)",
		"SA 3,7,258 generation 1", "granted here", "received "} {
		if !strings.Contains(out, want) {
			t.Errorf("server status lacks %q:\n%s", want, out)
		}
	}
	client := e.ok("status", "--socket", "client.sock")
	t.Logf("enclave status, server then client:\n%s\n%s", out, client)
	if !strings.Contains(client, "peer web1 (100.64.3.1)") || !strings.Contains(client, "[sending]") {
		t.Errorf("client status:\n%s", client)
	}
	var r struct {
		Kind  string
		Agent struct {
			Peers []struct {
				SAs []struct {
					TxPackets uint64 `json:"tx_packets"`
					RxPackets uint64 `json:"rx_packets"`
					RxBytes   uint64 `json:"rx_bytes"`
					SPIIn     string `json:"spi_in"`
				}
			}
		}
	}
	js := e.ok("status", "--socket", "client.sock", "--json")
	if err := json.Unmarshal([]byte(js), &r); err != nil || r.Kind != "agent" || len(r.Agent.Peers) != 1 || len(r.Agent.Peers[0].SAs) == 0 {
		t.Fatalf("status --json: %v\n%s", err, js)
	}
	if sa := r.Agent.Peers[0].SAs[0]; sa.TxPackets == 0 || sa.RxPackets == 0 || sa.RxBytes < uint64(len("hello from web1")) || len(sa.SPIIn) != 8 {
		t.Fatalf("the client's SA carried nothing: %+v", sa)
	}
	if long := regexp.MustCompile(`[0-9a-f]{32,}`).FindString(out + client + js); long != "" {
		t.Fatalf("status shows a long hex string (a key?): %s", long)
	}
	code, _, stderr := e.run("status", "--socket", "nobody.sock")
	if code != 1 || !strings.Contains(stderr, "nobody.sock") {
		t.Fatalf("status on a socket nobody answers: %d %s", code, stderr)
	}

	// Stopped, the agent says why and takes its socket away.
	server.cmd.Process.Signal(syscall.SIGTERM)
	<-server.done
	if !strings.Contains(server.log.String(), `"msg":"agent stopped","reason":"terminated signal received"`) {
		t.Fatalf("the agent did not say why it stopped:\n%s", server.log)
	}
	if _, err := os.Stat(filepath.Join(e.dir, "server.sock")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the status socket outlived its agent: %v", err)
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
	socks, server, _ = e.webAgentsWith(keyservers, serverArgs, nil)
	return socks, server
}

// webAgentsWith is webAgents with more arguments for the client too.
func (e *env) webAgentsWith(keyservers string, serverArgs, clientArgs []string) (socks string, server, client *process) {
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
	client = e.spawn(append([]string{"agent", "--ca", "ca/ca.crt", "--cert", "certs/laptop.crt", "--key", "certs/laptop.key",
		"--listen", fmt.Sprintf("127.0.0.1:%d", clientPort), "--netstack", "--socks5", socks,
		"--peer", fmt.Sprintf("100.64.3.0/24=127.0.0.1:%d", serverPort)}, clientArgs...)...)
	return socks, server, client
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
