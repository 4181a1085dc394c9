//go:build linux

package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// deployDir holds the files operators copy.
const deployDir = "../deploy"

// unit is what a systemd unit of deploy/systemd says about how its
// command runs.
type unit struct {
	user      string
	ambient   []string // capability names, lower case, without cap_
	bounding  []string
	execStart []string
	creds     map[string]string // LoadCredential: name -> file
}

func readUnit(t *testing.T, path string) unit {
	t.Helper()
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	u := unit{creds: map[string]string{}}
	caps := func(v string) []string {
		var out []string
		for _, c := range strings.Fields(v) {
			out = append(out, strings.TrimPrefix(strings.ToLower(c), "cap_"))
		}
		return out
	}
	for _, line := range strings.Split(string(raw), "\n") {
		k, v, ok := strings.Cut(line, "=")
		if !ok || strings.HasPrefix(line, "#") {
			continue
		}
		switch k {
		case "User":
			u.user = v
		case "AmbientCapabilities":
			u.ambient = caps(v)
		case "CapabilityBoundingSet":
			u.bounding = caps(v)
		case "ExecStart":
			u.execStart = strings.Fields(v)
		case "LoadCredential":
			name, file, _ := strings.Cut(v, ":")
			u.creds[name] = file
		}
	}
	return u
}

// TestUnitsStartAsShipped (issue 32, blocker 3): each unit's command line,
// an instance named for the device's files, runs as an unprivileged user with exactly the unit's capabilities
// (ambient and bounding sets, no new privileges), its credentials handed
// over in a directory of its own as systemd does (%d), and its example
// config pointed at this test's files instead of /etc/enclave: the key
// server serves, the agent binds its UDP ports (1000 and 1001) and its
// TUN device and renews its certificate into its state directory, the
// gateway binds its queues. The agent's unit as first
// shipped failed here ("bind: permission denied" on port 1000).
func TestUnitsStartAsShipped(t *testing.T) {
	needNetns(t)
	if _, err := exec.LookPath("setpriv"); err != nil {
		t.Skip("setpriv is not installed (apt-get install util-linux)")
	}
	const nobody = "65534" // the unit's user: no privileges but what the unit gives
	e := newEnv(t)
	tp := newTopology(t)
	e.issue("keyserver", "keyserver", "--host", "10.98.2.1")
	e.issue("alice", "admin")
	e.issue("agent", "client", "--enclave", "7", "--ip", "100.64.7.30/16")
	e.issue("gateway", "gateway", "--enclave", "7")
	e.ok("keys", "generate", "--out", "kek")
	e.ok("ca", "issuer", "--ca", "ca", "--name", "keyserver", "--out", "issuer")

	// The host's files, as docs/OPERATIONS.md lays them out, under root.
	root := filepath.Join(e.dir, "host")
	etc := filepath.Join(root, "etc", "enclave")
	for _, d := range []string{etc, filepath.Join(root, "credentials"), filepath.Join(root, "state"), filepath.Join(root, "log"), filepath.Join(root, "run")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for d := e.dir; d != os.TempDir() && d != "/"; d = filepath.Dir(d) { // the test's own directories: the unit's user passes through
		os.Chmod(d, 0o755)
	}
	for _, d := range []string{"state", "log", "run"} { // StateDirectory, LogsDirectory, RuntimeDirectory: the unit's user's
		chown(t, filepath.Join(root, d), nobody)
	}
	copyFile(t, filepath.Join(e.dir, "ca", "ca.crt"), filepath.Join(etc, "ca.crt"), 0o644)
	for _, n := range []string{"keyserver", "agent", "gateway"} {
		copyFile(t, filepath.Join(e.dir, "certs", n+".crt"), filepath.Join(etc, n+".crt"), 0o644)
		copyFile(t, filepath.Join(e.dir, "certs", n+".key"), filepath.Join(etc, n+".key"), 0o600)
	}
	copyFile(t, filepath.Join(e.dir, "kek"), filepath.Join(etc, "kek"), 0o600)
	copyFile(t, filepath.Join(e.dir, "issuer", "keyserver.crt"), filepath.Join(etc, "issuer.crt"), 0o644)
	copyFile(t, filepath.Join(e.dir, "issuer", "keyserver.key"), filepath.Join(etc, "issuer.key"), 0o600)
	copyFile(t, filepath.Join(deployDir, "examples", "policy.yaml"), filepath.Join(etc, "policy.yaml"), 0o644)
	local := strings.NewReplacer(
		"/etc/enclave/", etc+"/", "/var/lib/enclave/", root+"/state/", "/var/log/enclave/", root+"/log/", "/run/enclave/", root+"/run/",
		"192.0.2.1:7443", "10.98.2.1:7443", "192.0.2.10:7443", "10.98.2.1:7443", "0.0.0.0:7443", "10.98.2.1:7443", "192.0.2.20:1000", "10.98.2.2:1000")
	for _, n := range []string{"keyserver", "agent", "gateway"} {
		raw, err := os.ReadFile(filepath.Join(deployDir, "examples", n+".yaml"))
		if err != nil {
			t.Fatal(err)
		}
		text := local.Replace(string(raw))
		if n == "agent" {
			// Due at once: the agent renews itself, as the unit's user,
			// into the unit's state directory.
			if !strings.Contains(text, "\nrenew-before: auto\n") {
				t.Fatal("agent.yaml no longer sets renew-before: auto")
			}
			text = strings.Replace(text, "\nrenew-before: auto\n", "\nrenew-before: 100000h\n", 1)
		}
		if err := os.WriteFile(filepath.Join(etc, n+".yaml"), []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
	}

	start := func(name string) {
		t.Helper()
		// The instance is the device's name, which is its files' (here
		// the same as the unit's).
		u := readUnit(t, filepath.Join(deployDir, "systemd", "enclave-"+name+"@.service"))
		if u.user == "" || u.user == "root" {
			t.Fatalf("%s's unit runs as %q", name, u.user)
		}
		for _, c := range u.ambient {
			if !strings.Contains(" "+strings.Join(u.bounding, " ")+" ", " "+c+" ") {
				t.Fatalf("%s's unit gives %s but bounds it away", name, c)
			}
		}
		// %d: a directory only the unit's user reads, with its copies.
		creds := filepath.Join(root, "credentials", name)
		if err := os.MkdirAll(creds, 0o700); err != nil {
			t.Fatal(err)
		}
		for n, f := range u.creds {
			copyFile(t, local.Replace(strings.ReplaceAll(f, "%i", name)), filepath.Join(creds, n), 0o400)
			chown(t, filepath.Join(creds, n), nobody)
		}
		chown(t, creds, nobody)
		set := func(cs []string) string {
			s := "-all"
			for _, c := range cs {
				s += ",+" + c
			}
			return s
		}
		args := []string{"setpriv", "--reuid=" + nobody, "--regid=" + nobody, "--clear-groups", "--no-new-privs",
			"--inh-caps=" + set(u.ambient), "--ambient-caps=" + set(u.ambient), "--bounding-set=" + set(u.bounding), "--"}
		for i, a := range u.execStart {
			if i == 0 {
				a = strings.Replace(a, "/usr/local/bin/enclave", binary, 1)
			}
			args = append(args, local.Replace(strings.NewReplacer("%d", creds, "%i", name).Replace(a)))
		}
		if name == "agent" {
			// A distribution's /dev/net/tun is mode 0666 (the unit's
			// DeviceAllow lets it in); some test machines make it root's
			// alone. In the process's own mount namespace (ip netns exec
			// makes one), a node of mode 0666 is put over it, as on a host.
			dev := filepath.Join(root, "dev")
			os.Mkdir(dev, 0o755)
			args = append([]string{"sh", "-c", `mount -t tmpfs -o mode=755 none "$0" && mknod -m 666 "$0/tun" c 10 200 && mount --bind "$0/tun" /dev/net/tun && exec "$@"`, dev}, args...)
		}
		tp.spawn(name, tp.r, root, args...)
	}

	start("keyserver")
	tp.waitLog("keyserver", regexp.MustCompile(`key service listening`))
	admin := []string{binary, "admin", "--keyserver", "10.98.2.1:7443", "--ca", "ca/ca.crt", "--cert", "certs/alice.crt", "--key", "certs/alice.key"}
	for _, a := range [][]string{
		{"enclave", "add", "--id", "3", "--name", "web"}, {"enclave", "add", "--id", "7", "--name", "desks"},
		{"device", "add", "--name", "agent", "--role", "client", "--enclave", "7"},
		{"device", "add", "--name", "gateway", "--role", "gateway", "--enclave", "7"},
		{"pair", "allow", "3-7"}, {"grant", "add", "--device", "gateway", "--pairs", "3-7"},
	} {
		tp.inDir(tp.r, e.dir, append(admin, a...)...)
	}

	start("agent")
	tp.waitLog("agent", regexp.MustCompile(`agent listening`))
	sockets := tp.in(tp.r, "ss", "-Hulnp")
	for _, port := range []string{":1000 ", ":1001 "} {
		if !strings.Contains(sockets, port) {
			t.Errorf("the agent's unit did not bind UDP %s\n%s", port, sockets)
		}
	}
	if out := tp.in(tp.r, "ip", "-br", "link", "show", "enc0"); !strings.Contains(out, "enc0") {
		t.Errorf("no TUN device enc0: %s", out)
	}
	if _, err := os.Stat(filepath.Join(root, "run", "agent.sock")); err != nil {
		t.Errorf("the agent's status socket: %v", err)
	}

	tp.waitLog("agent", regexp.MustCompile(`certificate renewed`))
	if _, err := os.Stat(filepath.Join(root, "state", "agent", "agent.key")); err != nil {
		t.Errorf("the agent's renewed key in its state directory: %v", err)
	}

	start("gateway")
	tp.waitLog("gateway", regexp.MustCompile(`gateway up`))
	for name, log := range tp.logs {
		if m := regexp.MustCompile(`(?i)permission denied|operation not permitted`).FindString(log.String()); m != "" {
			t.Errorf("%s, as its unit runs it: %s\n%s", name, m, log)
		}
	}
}

func chown(t *testing.T, path, uid string) {
	t.Helper()
	if out, err := exec.Command("chown", uid+":"+uid, path).CombinedOutput(); err != nil {
		t.Fatalf("chown %s: %v %s", path, err, out)
	}
}

func copyFile(t *testing.T, from, to string, mode os.FileMode) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, b, mode); err != nil {
		t.Fatal(err)
	}
}
