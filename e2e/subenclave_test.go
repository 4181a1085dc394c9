package e2e

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// TestSubEnclaves: sub-enclave levels (DESIGN §3a) with real processes.
// An org of layout 8.8: enclave 3 with sub-enclaves 3.1 (server web1)
// and 3.2 (server db1), enclave 7 with 7.1 (clients), pair 3-7 allowed.
// Relay gateway gw-db is granted the sub-pair 3.2-7.1 only, gw-all the
// level-1 pair 3-7. A client through gw-db reaches both servers, and
// gw-db's flow log has the db flows and not the web ones (they pass it
// unread); a client through gw-all reaches both and gw-all reads both.
// Forbidding the sub-pair 3.1-7.1 cuts web1 off while db1, its sibling,
// still answers.
func TestSubEnclaves(t *testing.T) {
	if _, err := exec.LookPath("curl"); err != nil {
		t.Skip("curl is not installed (apt-get install curl); .ci/run installs it")
	}
	e := newEnv(t)
	e.issue("ks", "keyserver", "--host", "127.0.0.1")
	e.issue("alice", "admin")
	sub := []string{"--layout", "8.8"}
	e.issue("web1", "server", append(sub, "--enclave", "3.1", "--server-id", "31", "--ip", "100.64.3.1/16")...)
	e.issue("db1", "server", append(sub, "--enclave", "3.2", "--server-id", "32", "--ip", "100.64.3.2/16")...)
	e.issue("laptop", "client", append(sub, "--enclave", "7.1", "--ip", "100.64.7.1/16")...)
	e.issue("laptop2", "client", append(sub, "--enclave", "7.1", "--ip", "100.64.7.2/16")...)
	e.issue("gw-db", "gateway", append(sub, "--enclave", "7")...)
	e.issue("gw-all", "gateway", append(sub, "--enclave", "7")...)
	e.ok("keys", "generate", "--out", "kek")
	os.Chmod(e.dir+"/kek", 0o600)
	ks := e.start("--enclave-layout", "8.8")
	for _, c := range [][]string{
		{"enclave", "add", "--id", "3", "--name", "corp"},
		{"enclave", "add", "--id", "3.1", "--name", "web"},
		{"enclave", "add", "--id", "3.2", "--name", "db"},
		{"enclave", "add", "--id", "7", "--name", "fin"},
		{"enclave", "add", "--id", "7.1", "--name", "users"},
		{"device", "add", "--name", "web1", "--role", "server", "--enclave", "3.1", "--server-id", "31"},
		{"device", "add", "--name", "db1", "--role", "server", "--enclave", "3.2", "--server-id", "32"},
		{"device", "add", "--name", "laptop", "--role", "client", "--enclave", "7.1"},
		{"device", "add", "--name", "laptop2", "--role", "client", "--enclave", "7.1"},
		{"device", "add", "--name", "gw-db", "--role", "gateway", "--enclave", "7"},
		{"device", "add", "--name", "gw-all", "--role", "gateway", "--enclave", "7"},
		{"pair", "allow", "3-7"},
		{"grant", "add", "--device", "gw-db", "--pairs", "3.2-7.1"},
		{"grant", "add", "--device", "gw-all", "--pairs", "3-7"},
	} {
		e.ok(e.admin(ks, c...)...)
	}
	status := e.ok(e.admin(ks, "status")...)
	for _, want := range []string{"enclave layout: 8.8", "\n    3.1 web\n", "enclave 3.2", "3-7 generation 1", "gw-db: 3.2-7.1"} {
		if !strings.Contains(status, want) {
			t.Fatalf("admin status lacks %q:\n%s", want, status)
		}
	}

	fetch := func(who string) string {
		return e.ok("keys", "fetch", "--keyserver", ks.addr, "--ca", "ca/ca.crt", "--cert", "certs/"+who+".crt", "--key", "certs/"+who+".key")
	}
	if out := fetch("gw-db"); !strings.Contains(out, "EK_2(3.2,7.1,1)") || strings.Contains(out, "EK_1") {
		t.Fatalf("gw-db's keys: want EK_2(3.2,7.1,1) only:\n%s", out)
	}
	if out := fetch("web1"); !strings.Contains(out, "SK(3.1,7,31,1)") || !strings.Contains(out, "SK(3.1,7.1,31,1)") {
		t.Fatalf("web1's keys: want one towards 7 and one towards 7.1:\n%s", out)
	}
	relay := map[string]string{}
	for _, gw := range []string{"gw-db", "gw-all"} {
		relay[gw] = fmt.Sprintf("127.0.0.1:%d", freePortPair(t))
		g := e.spawn("gateway", "--ca", "ca/ca.crt", "--cert", "certs/"+gw+".crt", "--key", "certs/"+gw+".key", "--keyserver", ks.addr,
			"--relay", relay[gw], "--relay-to", "127.0.0.1/32", "--flow-log", gw+".jsonl", "--flow-idle", "1s", "--status-socket", gw+".sock")
		g.waitLog(t, "gateway up", 20*time.Second) // its ports bound before the next free ones are looked for
	}
	peers := []string{}
	for _, srv := range []string{"web1", "db1"} {
		text := "hello from " + srv
		web := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { fmt.Fprint(w, text) })}
		wl, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		go web.Serve(wl)
		t.Cleanup(func() { web.Close() })
		port := freePortPair(t)
		a := e.spawn("agent", "--ca", "ca/ca.crt", "--cert", "certs/"+srv+".crt", "--key", "certs/"+srv+".key", "--keyserver", ks.addr,
			"--listen", fmt.Sprintf("127.0.0.1:%d", port), "--netstack", "--expose", "80="+wl.Addr().String(), "--status-socket", srv+".sock")
		a.waitLog(t, "agent listening", 20*time.Second)
		overlay := map[string]string{"web1": "100.64.3.1", "db1": "100.64.3.2"}[srv]
		peers = append(peers, "--peer", fmt.Sprintf("%s/32=127.0.0.1:%d", overlay, port))
	}
	socks := map[string]string{}
	for client, gw := range map[string]string{"laptop": "gw-db", "laptop2": "gw-all"} {
		socks[client] = freeTCP(t)
		a := e.spawn(append([]string{"agent", "--ca", "ca/ca.crt", "--cert", "certs/" + client + ".crt", "--key", "certs/" + client + ".key",
			"--listen", fmt.Sprintf("127.0.0.1:%d", freePortPair(t)), "--netstack", "--socks5", socks[client], "--via", relay[gw], "--status-socket", client + ".sock"}, peers...)...)
		a.waitLog(t, "agent listening", 20*time.Second)
	}
	for _, client := range []string{"laptop", "laptop2"} {
		for _, srv := range []string{"web1", "db1"} {
			if out, err := curlVia(socks[client], srv, 50); err != nil {
				t.Fatalf("%s to %s: %v: %s", client, srv, err, out)
			}
		}
	}

	// The flow logs, once the flows went quiet (--flow-idle 1s).
	time.Sleep(3 * time.Second)
	pairsIn := func(gw string) []string {
		var out []string
		for _, f := range readFlows(t, filepath.Join(e.dir, gw+".jsonl")) {
			if !slices.Contains(out, f.Pair) {
				out = append(out, f.Pair)
			}
		}
		slices.Sort(out)
		return out
	}
	if got := pairsIn("gw-db"); !slices.Equal(got, []string{"3.2-7.1"}) {
		t.Fatalf("gw-db, granted 3.2-7.1, read pairs %v: want 3.2-7.1 only", got)
	}
	if got := pairsIn("gw-all"); !slices.Equal(got, []string{"3.1-7.1", "3.2-7.1"}) {
		t.Fatalf("gw-all, granted 3-7, read pairs %v: want both sub-pairs", got)
	}
	if st := e.ok("status", "--socket", "gw-db.sock"); !strings.Contains(st, "3.2-7.1") {
		t.Errorf("gw-db's status does not name its sub-pair:\n%s", st)
	}

	// Forbid one sub-pair: its server ends the SAs and refuses new ones;
	// the sibling sub-pair still works.
	e.ok(e.admin(ks, "pair", "forbid", "3.1-7.1")...)
	deadline := time.Now().Add(15 * time.Second)
	for {
		out, err := curlVia(socks["laptop2"], "web1", 1)
		if err != nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("web1 still answers laptop2 15 s after 3.1-7.1 was forbidden: %s", out)
		}
		time.Sleep(300 * time.Millisecond)
	}
	if out, err := curlVia(socks["laptop2"], "db1", 20); err != nil {
		t.Fatalf("db1 (sub-pair 3.2-7.1, still allowed) after 3.1-7.1 was forbidden: %v: %s", err, out)
	}
	status = e.ok(e.admin(ks, "status")...)
	if !strings.Contains(status, "3.1-7.1 forbidden") {
		t.Fatalf("admin status does not show the forbid rule:\n%s", status)
	}

	// The store keeps its layout: a start with another is refused, with
	// the reason; one without --enclave-layout goes on with 8.8.
	ks.stop()
	if code, _, stderr := e.run("keyserver", "--ca", "ca/ca.crt", "--cert", "certs/ks.crt", "--key", "certs/ks.key", "--kek-file", "kek",
		"--listen", "127.0.0.1:0", "--store", "ks.db", "--audit", "audit.log", "--enclave-layout", "6.5.5"); code == 0 || !strings.Contains(stderr, "the store's is 8.8") {
		t.Fatalf("the key server started on an 8.8 store with layout 6.5.5: exit %d\n%s", code, stderr)
	}
	ks = e.start()
	if out := e.ok(e.admin(ks, "status")...); !strings.Contains(out, "enclave layout: 8.8") {
		t.Fatalf("restarted without --enclave-layout:\n%s", out)
	}
}

// curlVia fetches http://SERVER's overlay address/ through a client
// agent's SOCKS5 proxy, up to tries times, and wants "hello from SERVER".
func curlVia(socks, server string, tries int) (string, error) {
	url := map[string]string{"web1": "http://100.64.3.1/", "db1": "http://100.64.3.2/"}[server]
	var out []byte
	var err error
	for i := 0; i < tries; i++ {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		out, err = exec.CommandContext(ctx, "curl", "-sS", "--max-time", "4", "--socks5", socks, url).CombinedOutput()
		cancel()
		if err == nil && strings.Contains(string(out), "hello from "+server) {
			return string(out), nil
		}
		if err == nil {
			err = fmt.Errorf("not %s's page", server)
		}
		time.Sleep(200 * time.Millisecond)
	}
	return string(out), err
}
