package lab

import (
	"bufio"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
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
	metrics metricsAddr
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

// benchKeyServer starts a key server process for a bench, on a new org
// in a temporary directory (dir, kept when ENCLAVE_BENCH_KEEP is set);
// done stops it and removes the directory.
func benchKeyServer(name string, progress func(string, ...any), extra ...string) (ks *ksProc, dir string, done func(), err error) {
	if dir, err = os.MkdirTemp("", "enclave-bench-"+name+"-"); err != nil {
		return nil, "", nil, err
	}
	remove := func() {
		if os.Getenv("ENCLAVE_BENCH_KEEP") == "" {
			os.RemoveAll(dir)
		} else {
			progress("kept %s (ENCLAVE_BENCH_KEEP)", dir)
		}
	}
	o, err := newOrg(dir, nil)
	if err == nil {
		ks, err = newKSProc(o, extra...)
	}
	if err == nil {
		progress("starting the key server")
		_, err = ks.start(30 * time.Second)
	}
	if err != nil {
		remove()
		return nil, "", nil, err
	}
	return ks, dir, func() { ks.kill(); remove() }, nil
}

// progressFunc writes a bench's progress to w, a line at a time
// (rewritten in place on a terminal).
func progressFunc(w io.Writer, terminal bool) func(string, ...any) {
	if w == nil {
		w = io.Discard
	}
	return func(format string, a ...any) {
		if terminal {
			fmt.Fprintf(w, "\r\033[K"+format, a...)
		} else {
			fmt.Fprintf(w, format+"\n", a...)
		}
	}
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
		k.addr, k.metrics = a[0], metricsAddr(a[1])
	case err := <-k.done:
		k.done <- err
		return 0, fmt.Errorf("lab: the key server exited: %v\n%s", err, tail(k.log.String(), 1500))
	case <-time.After(limit):
		k.kill()
		return 0, fmt.Errorf("lab: the key server did not listen within %s\n%s", limit, tail(k.log.String(), 1500))
	}
	for time.Since(t0) < limit {
		resp, err := http.Get("http://" + string(k.metrics) + "/readyz")
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

// cpu is the key server's CPU seconds so far.
func (k *ksProc) cpu() float64 { return k.metrics.value("process_cpu_seconds_total") }

// rss is the key server's resident memory in bytes.
func (k *ksProc) rss() float64 { return k.metrics.value("process_resident_memory_bytes") }
