package cli

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestStatusSocketSafety: a status socket never replaces a file that is
// no socket; a stale socket is replaced; one a live process answers on is
// refused when given; the socket is mode 0600 and goes with its server.
func TestStatusSocketSafety(t *testing.T) {
	dir := t.TempDir()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	report := func() statusReport { return statusReport{Kind: "agent"} }
	plain := filepath.Join(dir, "plain")
	os.WriteFile(plain, []byte("keep me"), 0o600)
	if _, err := serveStatus(plain, "agent", report, log); err == nil {
		t.Fatal("a status socket over a plain file")
	}
	if b, _ := os.ReadFile(plain); string(b) != "keep me" {
		t.Fatal("the plain file was touched")
	}

	sock := filepath.Join(dir, "a.sock")
	stale, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	stale.SetUnlinkOnClose(false)
	stale.Close() // a socket left by a process that ended
	closeA, err := serveStatus(sock, "agent", report, log)
	if err != nil {
		t.Fatalf("over a stale socket: %v", err)
	}
	if st, err := os.Stat(sock); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("socket mode: %v %v", st, err)
	}
	if _, err := serveStatus(sock, "agent", report, log); err == nil || !strings.Contains(err.Error(), "another process answers") {
		t.Fatalf("a second process on a live socket: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if r, err := fetchStatus(ctx, sock); err != nil || r.Kind != "agent" {
		t.Fatalf("fetch: %+v %v", r, err)
	}
	closeA()
	if _, err := os.Stat(sock); !os.IsNotExist(err) {
		t.Fatalf("the socket outlived its server: %v", err)
	}
}

// TestBytesIEC pins how status says a byte count, at the edges of each
// unit.
func TestBytesIEC(t *testing.T) {
	for _, c := range []struct {
		n    uint64
		want string
	}{
		{0, "0 B"},
		{1, "1 B"},
		{1023, "1023 B"},
		{1024, "1.0 KiB"},
		{1536, "1.5 KiB"},
		{1024*1024 - 52, "1023.9 KiB"},
		{1024*1024 - 1, "1.0 MiB"},
		{1024 * 1024, "1.0 MiB"},
		{3355443, "3.2 MiB"},
		{5 << 30, "5.0 GiB"},
		{1 << 40, "1.0 TiB"},
		{1 << 60, "1.0 EiB"},
		{^uint64(0), "16.0 EiB"},
	} {
		if got := bytesIEC(c.n); got != c.want {
			t.Errorf("bytesIEC(%d) = %q, want %q", c.n, got, c.want)
		}
	}
}

// TestStatusSocketSquatted: a status directory another user made first,
// or one others may write in, is refused by the process (no socket) and
// by enclave status (no answer believed); the socket has mode 0600 from
// the moment it exists.
func TestStatusSocketSquatted(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("making a directory of another user needs root (CI runs this as root)")
	}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	report := func() statusReport { return statusReport{Kind: "agent"} }
	base := t.TempDir()
	tmp := filepath.Join(base, "tmp") // as /tmp: anyone may add, only owners replace
	os.Mkdir(tmp, 0o700)
	os.Chmod(tmp, 0o777|os.ModeSticky)
	squat := filepath.Join(tmp, "enclave-1000")
	if err := os.Mkdir(squat, 0o777); err != nil {
		t.Fatal(err)
	}
	os.Chmod(squat, 0o777)
	const other = 54321
	if err := os.Chown(squat, other, other); err != nil {
		t.Fatal(err)
	}
	old := defaultStatusDir
	defaultStatusDir = func() string { return squat }
	defer func() { defaultStatusDir = old }()
	closeFn, err := serveStatus("", "agent", report, log)
	if err != nil {
		t.Fatal(err)
	}
	closeFn()
	if _, err := os.Lstat(filepath.Join(squat, "agent.sock")); !os.IsNotExist(err) {
		t.Fatalf("a socket was made in another user's directory: %v", err)
	}

	// The squatter answers in its own directory: enclave status refuses.
	fake := filepath.Join(squat, "agent.sock")
	ln, err := net.Listen("unix", fake)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	os.Chown(fake, other, other)
	go func() {
		c, err := ln.Accept()
		if err == nil {
			c.Write([]byte("HTTP/1.1 200 OK\r\nContent-Length: 16\r\n\r\n{\"kind\":\"agent\"}"))
			c.Close()
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := fetchStatus(ctx, fake); !errors.Is(err, errUntrusted) {
		t.Fatalf("a squatter's answer: %v, want errUntrusted", err)
	}

	// Our own directory, but others may write in it: refused both ways.
	open := filepath.Join(base, "open")
	os.Mkdir(open, 0o700)
	os.Chmod(open, 0o777)
	defaultStatusDir = func() string { return open }
	closeFn, _ = serveStatus("", "agent", report, log)
	closeFn()
	if _, err := os.Lstat(filepath.Join(open, "agent.sock")); !os.IsNotExist(err) {
		t.Fatalf("a socket was made in a directory others write in: %v", err)
	}

	// A private directory of ours: served, mode 0600, believed; a socket
	// of another user in it is not.
	mine := filepath.Join(base, "mine")
	defaultStatusDir = func() string { return mine }
	closeFn, err = serveStatus("", "agent", report, log)
	if err != nil {
		t.Fatal(err)
	}
	defer closeFn()
	sock := filepath.Join(mine, "agent.sock")
	if st, err := os.Lstat(sock); err != nil || st.Mode().Perm() != 0o600 || st.Mode().Type() != os.ModeSocket {
		t.Fatalf("socket: %v %v", st, err)
	}
	if r, err := fetchStatus(ctx, sock); err != nil || r.Kind != "agent" {
		t.Fatalf("fetch: %+v %v", r, err)
	}
	if entries, _ := os.ReadDir(mine); len(entries) != 1 {
		t.Fatalf("left beside the socket: %v", entries)
	}
	os.Chown(sock, other, other)
	if _, err := fetchStatus(ctx, sock); err != nil {
		t.Fatalf("a socket in root's own private directory is root's to trust: %v", err)
	}

	// Another user's directory in one only root writes in (a home
	// directory), reached through that user's link in /tmp (issue 31
	// review): not believed.
	homes := filepath.Join(base, "home")
	os.Mkdir(homes, 0o755)
	os.Chmod(homes, 0o755)
	home := filepath.Join(homes, "mallory")
	os.Mkdir(home, 0o755)
	os.Chown(home, other, other)
	link := filepath.Join(tmp, "enclave-1001")
	os.Symlink(home, link)
	os.Lchown(link, other, other)
	inHome := filepath.Join(home, "agent.sock")
	if err := os.Rename(sock, inHome); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{inHome, filepath.Join(link, "agent.sock")} {
		if _, err := fetchStatus(ctx, p); !errors.Is(err, errUntrusted) {
			t.Fatalf("a socket in another user's home (%s): %v", p, err)
		}
	}
	// A service's runtime directory under /run, root's, given to the
	// service's account: believed.
	svc, err := os.MkdirTemp("/run", "enclave-test-")
	if err != nil {
		t.Skipf("no /run to make a service directory in: %v", err)
	}
	defer os.RemoveAll(svc)
	os.Chmod(svc, 0o750)
	os.Chown(svc, other, other)
	os.Rename(inHome, sock)
	served := filepath.Join(svc, "agent.sock")
	closeSvc, err := serveStatus(served, "agent", report, log)
	if err != nil {
		t.Fatal(err)
	}
	defer closeSvc()
	os.Chown(served, other, other)
	if _, err := fetchStatus(ctx, served); err != nil {
		t.Fatalf("a service's socket in its runtime directory: %v", err)
	}
}

// TestParseSize: sizes in bytes, IEC and SI units; anything else refused.
func TestParseSize(t *testing.T) {
	for in, want := range map[string]int64{"0": 0, "500": 500, "100MiB": 100 << 20, "1.5GiB": 3 << 29, "2 KB": 2000, "7B": 7} {
		if got, err := parseSize(in); err != nil || got != want {
			t.Errorf("%q: %d %v, want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "MiB", "-1MiB", "10 parsecs", "1e30"} {
		if _, err := parseSize(in); err == nil {
			t.Errorf("%q accepted", in)
		}
	}
}
