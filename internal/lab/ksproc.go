package lab

import (
	"bufio"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"google.golang.org/grpc"

	"github.com/enclavekeys/enclave/internal/api"
	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/keyserver"
)

// ksProc is a key server running as a process of this binary, on a bbolt
// store in its directory, for the benches that measure the key service
// itself (enclave bench registry, bench watchers).
type ksProc struct {
	o       *org
	args    []string
	cmd     *exec.Cmd
	log     *syncBuffer
	addr    string // gRPC
	metrics string
	done    chan error
}

// newKSProc writes the key server's credentials and KEK into o's
// directory; start runs it.
func newKSProc(o *org, extra ...string) (*ksProc, error) {
	if _, err := o.issue(ca.Identity{Name: "ks", Role: ca.RoleKeyserver}, "127.0.0.1"); err != nil {
		return nil, err
	}
	kek := make([]byte, 32)
	if _, err := rand.Read(kek); err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(o.dir, "kek"), []byte(hex.EncodeToString(kek)+"\n"), 0o600); err != nil {
		return nil, err
	}
	args := append([]string{"keyserver", "--ca", "ca/ca.crt", "--cert", "certs/ks.crt", "--key", "certs/ks.key",
		"--kek-file", "kek", "--store", "ks.db", "--audit", "audit.log", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--pprof"}, extra...)
	return &ksProc{o: o, args: args}, nil
}

// start runs the key server and waits until it is ready (/readyz), at
// most limit; it returns how long that took from the process's start.
func (k *ksProc) start(limit time.Duration) (time.Duration, error) {
	bin, err := os.Executable()
	if err != nil {
		return 0, err
	}
	k.log = &syncBuffer{}
	k.cmd = exec.Command(bin, k.args...)
	k.cmd.Dir = k.o.dir
	pr, pw := io.Pipe()
	k.cmd.Stderr, k.cmd.Stdout = pw, k.log
	t0 := time.Now()
	if err := k.cmd.Start(); err != nil {
		return 0, err
	}
	k.done = make(chan error, 1)
	addrs := make(chan [2]string, 1)
	go func() {
		var metrics string
		sc := bufio.NewScanner(pr)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			line := sc.Bytes()
			k.log.Write(append(line, '\n'))
			var m map[string]any
			if json.Unmarshal(line, &m) != nil {
				continue
			}
			switch m["msg"] {
			case "metrics listening":
				metrics, _ = m["addr"].(string)
			case "key service listening":
				a, _ := m["addr"].(string)
				addrs <- [2]string{a, metrics}
			}
		}
		io.Copy(io.Discard, pr)
	}()
	go func() { k.done <- k.cmd.Wait(); pw.Close() }()
	select {
	case a := <-addrs:
		k.addr, k.metrics = a[0], a[1]
	case err := <-k.done:
		k.done <- err
		return 0, fmt.Errorf("lab: the key server exited: %v\n%s", err, tail(k.log.String(), 1500))
	case <-time.After(limit):
		k.kill()
		return 0, fmt.Errorf("lab: the key server did not listen within %s\n%s", limit, tail(k.log.String(), 1500))
	}
	for time.Since(t0) < limit {
		resp, err := http.Get("http://" + k.metrics + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return time.Since(t0), nil
			}
		}
		time.Sleep(5 * time.Millisecond)
	}
	k.kill()
	return 0, fmt.Errorf("lab: the key server was not ready within %s\n%s", limit, tail(k.log.String(), 1500))
}

// stop ends the key server with SIGTERM (a clean stop) and waits.
func (k *ksProc) stop() {
	if k.cmd == nil || k.cmd.Process == nil {
		return
	}
	k.cmd.Process.Signal(os.Interrupt)
	select {
	case <-k.done:
	case <-time.After(20 * time.Second):
		k.kill()
	}
	k.cmd = nil
}

func (k *ksProc) kill() {
	if k.cmd != nil && k.cmd.Process != nil {
		k.cmd.Process.Kill()
		<-k.done
	}
	k.cmd = nil
}

// dial connects to the key server as id (its certificate issued now).
func (k *ksProc) dial(id ca.Identity, opts ...grpc.DialOption) (*grpc.ClientConn, error) {
	creds, err := k.o.tlsCreds(id)
	if err != nil {
		return nil, err
	}
	return keyserver.Dial(k.addr, "127.0.0.1", creds, append(opts, grpc.WithDefaultCallOptions(grpc.WaitForReady(true)))...)
}

// admin connects as the org's administrator.
func (k *ksProc) admin() (api.AdminClient, func(), error) {
	conn, err := k.dial(ca.Identity{Name: "alice", Role: ca.RoleAdmin}, grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(256<<20)))
	if err != nil {
		return nil, nil, err
	}
	return api.NewAdminClient(conn), func() { conn.Close() }, nil
}

// metric reads one series of the key server's metrics.
func (k *ksProc) metric(series string) (float64, error) {
	resp, err := http.Get("http://" + k.metrics + "/metrics")
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), series+" "); ok {
			return strconv.ParseFloat(v, 64)
		}
	}
	return 0, errors.Join(fmt.Errorf("lab: the key server has no metric %s", series), sc.Err())
}

// cpu is the key server's CPU seconds so far.
func (k *ksProc) cpu() float64 {
	v, _ := k.metric("process_cpu_seconds_total")
	return v
}

// collect has the key server collect its garbage (its pprof heap
// endpoint with gc=1: it runs with --pprof), so that the memory read next
// is what it keeps.
func (k *ksProc) collect() {
	if resp, err := http.Get("http://" + k.metrics + "/debug/pprof/heap?gc=1"); err == nil {
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
}

// saveProfile writes one of the key server's pprof profiles to path (for
// a reader's go tool pprof; no figure depends on it).
func (k *ksProc) saveProfile(endpoint, path string) {
	resp, err := http.Get("http://" + k.metrics + endpoint)
	if err != nil {
		return
	}
	defer resp.Body.Close()
	if f, err := os.Create(path); err == nil {
		io.Copy(f, resp.Body)
		f.Close()
	}
}

// rss is the key server's resident memory in bytes.
func (k *ksProc) rss() float64 {
	v, _ := k.metric("process_resident_memory_bytes")
	return v
}
