package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	// Linked in only so that a change to the commands invalidates the test
	// cache: the tests themselves run the built binary.
	_ "github.com/enclavekeys/enclave/internal/cli"
)

var binary string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "enclave-e2e")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	// The processes the tests start know nothing of the user's admin
	// context (~/.config/enclave/admin.yaml, ENCLAVE_*).
	for _, k := range []string{"ENCLAVE_CONTEXT", "ENCLAVE_KEYSERVER", "ENCLAVE_SERVER_NAME", "ENCLAVE_CA", "ENCLAVE_CERT", "ENCLAVE_KEY"} {
		os.Unsetenv(k)
	}
	os.Setenv("XDG_CONFIG_HOME", filepath.Join(dir, "config"))
	binary = filepath.Join(dir, "enclave")
	out, err := exec.Command("go", "build", "-o", binary, "github.com/enclavekeys/enclave/cmd/enclave").CombinedOutput()
	if err != nil {
		fmt.Fprintf(os.Stderr, "go build: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// env is a working directory with a CA and certificates.
type env struct {
	t   *testing.T
	dir string
}

func newEnv(t *testing.T) *env {
	e := &env{t: t, dir: t.TempDir()}
	e.ok("ca", "init", "--dir", "ca", "--org", "example.org")
	return e
}

// run executes the binary in the env's directory and returns exit code,
// stdout and stderr.
func (e *env) run(args ...string) (int, string, string) {
	e.t.Helper()
	// Bounded: a command that should end but serves on (a refusal that
	// did not happen) fails its test instead of hanging the suite.
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, binary, args...)
	cmd.Dir = e.dir
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	var ee *exec.ExitError
	switch {
	case err == nil:
		return 0, out.String(), errb.String()
	case errors.As(err, &ee):
		return ee.ExitCode(), out.String(), errb.String()
	}
	e.t.Fatalf("%v: %v", args, err)
	return -1, "", ""
}

func (e *env) ok(args ...string) string {
	e.t.Helper()
	code, out, errs := e.run(args...)
	if code != 0 {
		e.t.Fatalf("enclave %s: exit %d\n%s%s", strings.Join(args, " "), code, out, errs)
	}
	return out
}

func (e *env) issue(name, role string, extra ...string) {
	e.t.Helper()
	e.ok(append([]string{"cert", "issue", "--ca", "ca", "--name", name, "--role", role, "--out", "certs"}, extra...)...)
}

// keyserver is a running enclave keyserver process.
type keyserver struct {
	cmd     *exec.Cmd
	addr    string
	metrics string
	stderr  *lockedBuffer
	done    chan error
}

// lockedBuffer collects a process's log while the test reads it.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// start runs enclave keyserver with the given extra flags on free loopback
// ports and waits until /readyz answers.
func (e *env) start(extra ...string) *keyserver {
	e.t.Helper()
	return e.startWith(append([]string{"--store", "ks.db", "--audit", "audit.log"}, extra...)...)
}

// startWith runs enclave keyserver with the given storage and extra flags.
func (e *env) startWith(extra ...string) *keyserver {
	e.t.Helper()
	args := append([]string{"keyserver", "--ca", "ca/ca.crt", "--cert", "certs/ks.crt", "--key", "certs/ks.key",
		"--kek-file", "kek", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"}, extra...)
	cmd := exec.Command(binary, args...)
	cmd.Dir = e.dir
	pr, pw := io.Pipe()
	cmd.Stderr = pw
	if err := cmd.Start(); err != nil {
		e.t.Fatal(err)
	}
	ks := &keyserver{cmd: cmd, stderr: &lockedBuffer{}, done: make(chan error, 1)}
	addrs := make(chan [2]string, 1)
	go func() {
		var grpcAddr, metricsAddr string
		sc := bufio.NewScanner(pr)
		for sc.Scan() {
			line := sc.Bytes()
			ks.stderr.Write(append(line, '\n'))
			var m map[string]any
			if json.Unmarshal(line, &m) != nil {
				continue
			}
			switch m["msg"] {
			case "metrics listening":
				metricsAddr, _ = m["addr"].(string)
			case "key service listening":
				grpcAddr, _ = m["addr"].(string)
				addrs <- [2]string{grpcAddr, metricsAddr}
			}
		}
	}()
	go func() { ks.done <- cmd.Wait(); pw.Close() }()
	select {
	case a := <-addrs:
		ks.addr, ks.metrics = a[0], a[1]
	case err := <-ks.done:
		e.t.Fatalf("keyserver exited: %v\n%s", err, ks.stderr)
	case <-time.After(20 * time.Second):
		cmd.Process.Kill()
		e.t.Fatalf("keyserver did not start\n%s", ks.stderr)
	}
	e.t.Cleanup(func() { ks.cmd.Process.Kill(); <-ks.done })
	for i := 0; i < 100; i++ {
		resp, err := http.Get("http://" + ks.metrics + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return ks
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	e.t.Fatalf("keyserver never became ready\n%s", ks.stderr)
	return nil
}

func (k *keyserver) kill9() {
	k.cmd.Process.Signal(os.Kill)
	<-k.done
	k.done <- nil // for the cleanup
}

// stop ends the key server with SIGTERM (a clean shutdown) and waits.
func (k *keyserver) stop() {
	k.cmd.Process.Signal(syscall.SIGTERM)
	<-k.done
	k.done <- nil // for the cleanup
}
