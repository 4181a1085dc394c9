package e2e

import (
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// etcdBinary builds the etcd server at the version go.mod pins (the same
// release as the client the key service links), once per test binary.
// Debian's etcd-server is 3.4, three minor releases behind that client;
// building it from the module cache needs nothing beyond the Go toolchain
// and is checked by go.sum.
func etcdBinary(t *testing.T) string {
	t.Helper()
	path := filepath.Join(filepath.Dir(binary), "etcd")
	if _, err := os.Stat(path); err == nil {
		return path
	}
	out, err := exec.Command("go", "build", "-o", path, "go.etcd.io/etcd/server/v3").CombinedOutput()
	if err != nil {
		t.Fatalf("building etcd: %v\n%s", err, out)
	}
	return path
}

// etcdMember is one etcd server process of a test cluster.
type etcdMember struct {
	*process
	client string // its client URL
}

// startEtcdCluster runs n etcd server processes on loopback as one
// cluster and waits until each answers /health.
func startEtcdCluster(t *testing.T, e *env, n int) []*etcdMember {
	t.Helper()
	bin := etcdBinary(t)
	type ports struct{ client, peer string }
	ps := make([]ports, n)
	var initial []string
	for i := range ps {
		ps[i] = ports{freeTCP(t), freeTCP(t)}
		initial = append(initial, fmt.Sprintf("m%d=http://%s", i, ps[i].peer))
	}
	members := make([]*etcdMember, n)
	for i, p := range ps {
		cmd := exec.Command(bin, "--name", fmt.Sprintf("m%d", i), "--data-dir", filepath.Join(e.dir, fmt.Sprintf("etcd%d", i)),
			"--listen-client-urls", "http://"+p.client, "--advertise-client-urls", "http://"+p.client,
			"--listen-peer-urls", "http://"+p.peer, "--initial-advertise-peer-urls", "http://"+p.peer,
			"--initial-cluster", strings.Join(initial, ","), "--initial-cluster-state", "new", "--initial-cluster-token", "enclave-e2e",
			"--log-level", "warn")
		pr := &process{cmd: cmd, log: &lockedBuffer{}, done: make(chan struct{})}
		cmd.Stderr = pr.log
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		go func() { cmd.Wait(); close(pr.done) }()
		t.Cleanup(pr.kill9)
		members[i] = &etcdMember{pr, "http://" + p.client}
	}
	deadline := time.Now().Add(30 * time.Second)
	for _, m := range members {
		for {
			resp, err := http.Get(m.client + "/health")
			if err == nil {
				body, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				if strings.Contains(string(body), `"health":"true"`) {
					break
				}
			}
			if time.Now().After(deadline) {
				t.Fatalf("etcd %s not healthy:\n%s", m.client, m.log)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	return members
}

// metricValue reads one series' value from a Prometheus text endpoint (0
// when it is not there).
func metricValue(t *testing.T, addr, series string) float64 {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		return 0
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	m := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(series) + ` (\S+)$`).FindSubmatch(body)
	if m == nil {
		return 0
	}
	v, _ := strconv.ParseFloat(string(m[1]), 64)
	return v
}

// TestEtcdClusterFailover: two key-server replicas on a three-member
// cluster of real etcd server processes serve a server agent (given both
// replicas' addresses), a client agent and an admin. Under traffic (HTTP
// requests through the SA every 50 ms), one etcd member and the replica
// the agent is connected to are killed with SIGKILL. The traffic goes on
// without a failed request, the agent fails over to the other replica
// (a pair allowed through it reaches the agent), admin writes go on at the
// other replica, and the audit log in etcd verifies with every write in it.
func TestEtcdClusterFailover(t *testing.T) {
	if testing.Short() {
		t.Skip("builds etcd and runs a cluster of three")
	}
	e := newEnv(t)
	members := startEtcdCluster(t, e, 3)
	var urls []string
	for _, m := range members {
		urls = append(urls, m.client)
	}
	etcd := strings.Join(urls, ",")
	e.pairCerts()
	a := e.startWith("--etcd", etcd)
	b := e.startWith("--etcd", etcd)
	e.pairRegister(a)
	e.ok(e.admin(a, "enclave", "add", "--id", "9", "--name", "lab")...)

	metrics := freeTCP(t)
	socks, server := e.webAgents(a.addr+","+b.addr, "--metrics-listen", metrics)
	server.waitLog(t, `"agent up"`, 30*time.Second)

	proxy, _ := url.Parse("socks5://" + socks)
	client := &http.Client{Transport: &http.Transport{Proxy: http.ProxyURL(proxy), DisableKeepAlives: true}, Timeout: 5 * time.Second}
	get := func() error {
		resp, err := client.Get("http://100.64.3.1/")
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		if !strings.Contains(string(body), "hello from web1") {
			return fmt.Errorf("answer %q", body)
		}
		return nil
	}
	deadline := time.Now().Add(30 * time.Second)
	for get() != nil {
		if time.Now().After(deadline) {
			t.Fatalf("no answer through the SA:\n%s", server.log)
		}
		time.Sleep(200 * time.Millisecond)
	}
	// Traffic from here to the end: every request must succeed.
	var sent, failed atomic.Int64
	var lastErr atomic.Value
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case <-stop:
				return
			case <-time.After(50 * time.Millisecond):
			}
			sent.Add(1)
			if err := get(); err != nil {
				failed.Add(1)
				lastErr.Store(err.Error())
			}
		}
	}()
	time.Sleep(time.Second)
	fetches := metricValue(t, metrics, `enclave_agent_keyservice_requests_total{rpc="GetServerKeys"}`)

	// One etcd member and the replica the agent uses (the first it was
	// given) die at once.
	members[0].kill9()
	a.kill9()
	killed := time.Now()
	// An admin write at the other replica: it waits out the etcd election
	// the member's death may start (seconds on a loaded 2-core machine,
	// past the admin's default 10 s once in CI).
	e.ok(e.admin(b, "pair", "allow", "3-9", "--timeout", "30s")...)
	e.ok(e.admin(b, "device", "add", "--name", "web2", "--role", "server", "--enclave", "3", "--server-id", "259", "--timeout", "30s")...)
	// The agent hears of the change through replica B: it fetches its
	// keys again (the new pair's included).
	for metricValue(t, metrics, `enclave_agent_keyservice_requests_total{rpc="GetServerKeys"}`) <= fetches ||
		metricValue(t, metrics, `enclave_agent_server_keys`) != 2 { // SK(3,7) and the new SK(3,9)
		if time.Since(killed) > 30*time.Second {
			t.Fatalf("the server agent did not fail over to replica B:\n%s", server.log)
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Logf("the server agent fetched its keys through replica B %v after the kills", time.Since(killed).Round(time.Millisecond))
	time.Sleep(2 * time.Second)
	close(stop)
	<-done
	t.Logf("%d requests through the SA across the kills, %d failed", sent.Load(), failed.Load())
	if failed.Load() != 0 {
		t.Fatalf("%d of %d requests failed (last: %v)", failed.Load(), sent.Load(), lastErr.Load())
	}
	status := e.ok(e.admin(b, "status")...)
	for _, want := range []string{"3-9", "web2"} {
		if !strings.Contains(status, want) {
			t.Fatalf("status through B lacks %s:\n%s", want, status)
		}
	}
	out := e.ok("audit", "verify", "--etcd", strings.Join(urls[1:], ","), "--kek-file", "kek")
	if !strings.HasPrefix(out, "OK: ") {
		t.Fatalf("etcd audit: %s", out)
	}
}
