package cli

import (
	"context"
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
