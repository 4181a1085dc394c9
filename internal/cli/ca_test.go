package cli

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestCAAndCertCommands(t *testing.T) {
	dir := t.TempDir()
	caDir, out := filepath.Join(dir, "ca"), filepath.Join(dir, "certs")
	steps := []struct {
		name   string
		args   []string
		code   int
		output string // substring of stdout (0) or stderr (otherwise)
	}{
		{"init", []string{"ca", "init", "--dir", caDir, "--org", "example.org"}, 0, "created CA for example.org"},
		{"init again", []string{"ca", "init", "--dir", caDir, "--org", "example.org"}, 1, "refusing to overwrite"},
		{"bad org", []string{"ca", "init", "--dir", filepath.Join(dir, "x"), "--org", "Example Org"}, 2, "trust domain"},
		{"missing flags", []string{"ca", "init", "--dir", caDir}, 2, "required"},
		{"server", []string{"cert", "issue", "--ca", caDir, "--name", "web1", "--role", "server", "--enclave", "3", "--server-id", "258", "--out", out}, 0, "spiffe://example.org/enclave/3/server/web1"},
		{"gateway", []string{"cert", "issue", "--ca", caDir, "--name", "gw", "--role", "gateway", "--out", out, "--days", "30"}, 0, "spiffe://example.org/gateway/gw"},
		{"keyserver", []string{"cert", "issue", "--ca", caDir, "--name", "ks", "--role", "keyserver", "--host", "localhost,127.0.0.1", "--out", out}, 0, "keyserver/ks"},
		{"again", []string{"cert", "issue", "--ca", caDir, "--name", "web1", "--role", "server", "--enclave", "3", "--server-id", "258", "--out", out}, 1, "refusing to overwrite"},
		{"bad role", []string{"cert", "issue", "--ca", caDir, "--name", "x", "--role", "root", "--out", out}, 2, "unknown role"},
		{"server without id", []string{"cert", "issue", "--ca", caDir, "--name", "x", "--role", "server", "--enclave", "3", "--out", out}, 2, "server id"},
		{"enclave 0", []string{"cert", "issue", "--ca", caDir, "--name", "x", "--role", "client", "--enclave", "0", "--out", out}, 2, "reserved"},
		{"bad days", []string{"cert", "issue", "--ca", caDir, "--name", "x", "--role", "client", "--days", "0", "--out", out}, 2, "validity"},
		{"no CA", []string{"cert", "issue", "--ca", filepath.Join(dir, "none"), "--name", "x", "--role", "client", "--out", out}, 2, "--ca"},
		{"show", []string{"cert", "show", filepath.Join(out, "web1.crt")}, 0, "server id:   258"},
		{"show key file", []string{"cert", "show", filepath.Join(out, "web1.key")}, 2, "is a private key, not a certificate"},
		{"show CA", []string{"cert", "show", filepath.Join(caDir, "ca.crt")}, 0, "org:         example.org (the org CA"},
	}
	for _, s := range steps {
		code, stdout, stderr := runCLI(s.args...)
		got := stdout
		if s.code != 0 {
			got = stderr
		}
		if code != s.code || !strings.Contains(got, s.output) {
			t.Fatalf("%s: exit %d (want %d), stdout %q, stderr %q", s.name, code, s.code, stdout, stderr)
		}
	}
	code, stdout, _ := runCLI("cert", "show", "--json", filepath.Join(out, "ks.crt"))
	var v map[string]any
	if code != 0 || json.Unmarshal([]byte(stdout), &v) != nil || v["role"] != "keyserver" || v["expired"] != false {
		t.Fatalf("show --json: %d %s", code, stdout)
	}
	if hosts, _ := v["hosts"].([]any); len(hosts) != 2 {
		t.Fatalf("hosts %v", v["hosts"])
	}
}

// TestLongInputIsCut: an error that repeats a huge argument repeats only
// its start and says how long it was.
func TestLongInputIsCut(t *testing.T) {
	dir := t.TempDir()
	caDir := filepath.Join(dir, "ca")
	if code, _, stderr := runCLI("ca", "init", "--dir", caDir, "--org", "example.org"); code != 0 {
		t.Fatal(stderr)
	}
	long := strings.Repeat("a", 5000)
	for _, args := range [][]string{
		{"cert", "issue", "--ca", caDir, "--name", long, "--role", "client", "--out", filepath.Join(dir, "certs")},
		{"keys", "derive", "--org-key", strings.Repeat("00", 32), "--enclaves", long + ",3", "--generation", "1"},
		{"packet", "seal", "--sa-key", strings.Repeat("00", 32), "--spi", "80001234", "--iv", long, "--vc", "3,7,258", ""},
		{"keys", "derive", "--" + long},
		{long, "x"},
		{"cert", "show", "/" + long},
	} {
		code, _, stderr := runCLI(args...)
		if code != 2 || len(stderr) > 400 || !strings.Contains(stderr, "bytes)") {
			t.Errorf("%s %s: exit %d, %d bytes on stderr: %.200q", args[0], args[1], code, len(stderr), stderr)
		}
	}
}

// TestNoKeyEchoed: a key typed without its flag, or anywhere cobra repeats
// an argument, is not printed back.
func TestNoKeyEchoed(t *testing.T) {
	key := strings.Repeat("0f", 32)
	for _, args := range [][]string{
		{"keys", "derive", key},
		{"keys", "generate", key},
		{key},
		{"admin", key},
		{"keys", "derive", "--org-key", key + "0", "--enclaves", "3,7", "--generation", "1"},
	} {
		code, stdout, stderr := runCLI(args...)
		if code != 2 || strings.Contains(stdout+stderr, key[:32]) {
			t.Errorf("%v: exit %d, output repeats the key: %q %q", args[:1], code, stdout, stderr)
		}
	}
}

// TestUnknownSubcommand: a mistyped word under a group of commands is a
// usage error (exit 2) with a suggestion, not help and exit 0.
func TestUnknownSubcommand(t *testing.T) {
	for _, args := range [][]string{
		{"admin", "device", "revokee", "web1"},
		{"admin", "enclave", "ad"},
		{"keys", "derivee"},
		{"cert", "issu"},
		{"audit", "verfy", "x"},
	} {
		code, _, stderr := runCLI(args...)
		if code != 2 || !strings.Contains(stderr, "unknown command") {
			t.Errorf("%v: exit %d %q", args, code, stderr)
		}
	}
	if _, _, stderr := runCLI("admin", "device", "revokee"); !strings.Contains(stderr, "did you mean revoke") {
		t.Errorf("no suggestion: %q", stderr)
	}
	if code, stdout, _ := runCLI("admin", "device"); code != 0 || !strings.Contains(stdout, "\nCommands:") {
		t.Errorf("a bare group: exit %d %q", code, stdout)
	}
}

// TestBoundedFileReads: a file argument that never ends (/dev/zero) or is
// too large is refused at once, not read into memory.
func TestBoundedFileReads(t *testing.T) {
	for _, args := range [][]string{
		{"keys", "derive", "--org-key", "@/dev/zero", "--enclaves", "3,7", "--generation", "1"},
		{"cert", "show", "/dev/zero"},
		{"keyserver", "--config", "/dev/zero"},
		{"packet", "open", "--sa-key", "@/dev/zero", strings.Repeat("00", 40)},
	} {
		code, _, stderr := runCLI(args...)
		if code != 2 || !strings.Contains(stderr, "too large") {
			t.Errorf("%v: exit %d %q", args, code, stderr)
		}
	}
}

// TestCertShowNotYetValid: a certificate whose validity has not begun is
// not shown as valid.
func TestCertShowNotYetValid(t *testing.T) {
	dir := t.TempDir()
	caDir, out := filepath.Join(dir, "ca"), filepath.Join(dir, "certs")
	runCLI("ca", "init", "--dir", caDir, "--org", "example.org")
	if code, _, stderr := runCLI("cert", "issue", "--ca", caDir, "--name", "c", "--role", "client", "--out", out); code != 0 {
		t.Fatal(stderr)
	}
	saved := now
	defer func() { now = saved }()
	now = func() time.Time { return saved().Add(-time.Hour) }
	code, stdout, _ := runCLI("cert", "show", filepath.Join(out, "c.crt"))
	if code != 0 || !strings.Contains(stdout, "NOT YET VALID") || strings.Contains(stdout, "(valid)") {
		t.Fatalf("exit %d: %s", code, stdout)
	}
	if code, _, stderr := runCLI("ca", "init", "--dir", filepath.Join(dir, "dot"), "--org", "."); code != 2 {
		t.Fatalf("--org .: exit %d %s", code, stderr)
	}
}

// TestMissingFilesAreUsage: a file the user named that is not there is bad
// input, exit 2, whichever command and flag.
func TestMissingFilesAreUsage(t *testing.T) {
	none := filepath.Join(t.TempDir(), "none")
	for _, args := range [][]string{
		{"keys", "derive", "--org-key", "@" + none, "--enclaves", "3,7", "--generation", "1"},
		{"cert", "show", none},
		{"cert", "issue", "--ca", none, "--name", "x", "--role", "client", "--out", none},
		{"admin", "--keyserver", "127.0.0.1:1", "--ca", none, "--cert", none, "--key", none, "status"},
		{"keys", "fetch", "--keyserver", "127.0.0.1:1", "--ca", none, "--cert", none, "--key", none},
		{"keyserver", "--ca", none, "--cert", none, "--key", none, "--store", none, "--audit", none},
		{"keyserver", "--config", none},
		{"audit", "verify", none},
		{"packet", "open", "--sa-key", strings.Repeat("00", 32), "--pcap", none},
	} {
		if code, _, stderr := runCLI(args...); code != 2 {
			t.Errorf("%v: exit %d, want 2 (%s)", args[:2], code, stderr)
		}
	}
}

// TestKeyGivenForCertificate: a private key given where a certificate
// goes (--ca ca/ca.key), or the other way round, is bad input (exit 2)
// that says which file is which.
func TestKeyGivenForCertificate(t *testing.T) {
	dir := t.TempDir()
	caDir, out := filepath.Join(dir, "ca"), filepath.Join(dir, "certs")
	runCLI("ca", "init", "--dir", caDir, "--org", "example.org")
	runCLI("cert", "issue", "--ca", caDir, "--name", "c1", "--role", "client", "--ip", "100.64.1.1/16", "--out", out)
	crt, key, caKey := filepath.Join(out, "c1.crt"), filepath.Join(out, "c1.key"), filepath.Join(caDir, "ca.key")
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"agent", "--netstack", "--ca", caKey, "--cert", crt, "--key", key}, "--ca: ca: not a PEM certificate or key: " + caKey + " holds a private key, not certificates"},
		{[]string{"agent", "--netstack", "--ca", filepath.Join(caDir, "ca.crt"), "--cert", crt, "--key", crt}, "is a certificate, not a private key"},
	} {
		code, _, stderr := runCLI(c.args...)
		if code != 2 || !strings.Contains(stderr, c.want) {
			t.Errorf("%v: exit %d, %q; want 2 and %q", c.args, code, stderr, c.want)
		}
	}
}

// TestCertRenew: renew writes a new pair for the same identity in place of
// the old one (kept as .old), the key mode 0600; with another CA of the
// org it moves the device to it.
func TestCertRenew(t *testing.T) {
	dir := t.TempDir()
	caDir, ca2, out := filepath.Join(dir, "ca"), filepath.Join(dir, "ca2"), filepath.Join(dir, "certs")
	runCLI("ca", "init", "--dir", caDir, "--org", "example.org")
	runCLI("ca", "init", "--dir", ca2, "--org", "example.org")
	runCLI("cert", "issue", "--ca", caDir, "--name", "web1", "--role", "server", "--enclave", "3", "--server-id", "258", "--ip", "100.64.3.1/16", "--out", out)
	crt := filepath.Join(out, "web1.crt")
	_, before, _ := runCLI("cert", "show", "--json", crt)
	code, stdout, stderr := runCLI("cert", "renew", "--ca", ca2, "--cert", crt, "--days", "30")
	if code != 0 || !strings.Contains(stdout, "renewed spiffe://example.org/enclave/3/server/web1") {
		t.Fatalf("renew: %d %s %s", code, stdout, stderr)
	}
	_, after, _ := runCLI("cert", "show", "--json", crt)
	var b, a certView
	json.Unmarshal([]byte(before), &b)
	json.Unmarshal([]byte(after), &a)
	if a.Identity != b.Identity || a.Overlay != "100.64.3.1/16" || a.ServerID == nil || *a.ServerID != 258 || a.Fingerprint == b.Fingerprint {
		t.Fatalf("before %+v, after %+v", b, a)
	}
	if _, old, _ := runCLI("cert", "show", "--json", crt+".old"); !strings.Contains(old, b.Fingerprint) {
		t.Fatalf("the old certificate was not kept: %s", old)
	}
	if st, err := os.Stat(filepath.Join(out, "web1.key")); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("key mode: %v %v", st, err)
	}
	// The new pair is of the new CA: an agent given only the old CA
	// refuses it, one given both (a bundle) takes it.
	if code, _, stderr := runCLI("agent", "--netstack", "--ca", filepath.Join(caDir, "ca.crt"), "--cert", crt, "--key", filepath.Join(out, "web1.key"), "--listen", "127.0.0.1:1", "--status-socket", "off"); code != 1 || !strings.Contains(stderr, "not a valid certificate of this CA") {
		t.Fatalf("old CA alone: %d %s", code, stderr)
	}
	if code, _, stderr := runCLI("cert", "renew", "--ca", caDir, "--cert", filepath.Join(dir, "none.crt")); code != 2 {
		t.Fatalf("renewing a missing certificate: %d %s", code, stderr)
	}
}

// TestCertRequestSign: a key made on the host, a request for it signed by
// the CA with the identity the operator gives; the key never leaves the
// host, files are not overwritten, a file that is no request is refused.
func TestCertRequestSign(t *testing.T) {
	dir := t.TempDir()
	caDir, host, certs := filepath.Join(dir, "ca"), filepath.Join(dir, "host"), filepath.Join(dir, "certs")
	runCLI("ca", "init", "--dir", caDir, "--org", "example.org")
	if code, out, stderr := runCLI("cert", "request", "--name", "web2", "--out", host); code != 0 || !strings.Contains(out, "web2.csr") {
		t.Fatalf("request: %d %s %s", code, out, stderr)
	}
	if code, _, _ := runCLI("cert", "request", "--name", "web2", "--out", host); code == 0 {
		t.Fatal("a second request overwrote the key")
	}
	code, out, stderr := runCLI("cert", "sign", "--ca", caDir, "--csr", filepath.Join(host, "web2.csr"), "--name", "web2", "--role", "server", "--enclave", "3", "--server-id", "302", "--ip", "100.64.3.3/16", "--out", certs)
	if code != 0 || !strings.Contains(out, "issued spiffe://example.org/enclave/3/server/web2") {
		t.Fatalf("sign: %d %s %s", code, out, stderr)
	}
	// The certificate and the host's key make a device.
	if code, _, stderr := runCLI("agent", "--netstack", "--ca", filepath.Join(caDir, "ca.crt"), "--cert", filepath.Join(certs, "web2.crt"), "--key", filepath.Join(host, "web2.key"), "--listen", "127.0.0.1:1", "--status-socket", "off"); code != 2 || !strings.Contains(stderr, "needs --keyserver") {
		t.Fatalf("the signed certificate with the host's key: %d %s", code, stderr)
	}
	if code, _, _ := runCLI("cert", "sign", "--ca", caDir, "--csr", filepath.Join(host, "web2.key"), "--name", "x", "--role", "client", "--out", certs); code != 2 {
		t.Fatalf("a key given as the request: exit %d", code)
	}
}
