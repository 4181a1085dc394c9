package cli

import (
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/spf13/cobra"
)

// The deploy files (deploy/examples, deploy/systemd) are what operators
// copy: each example config must load into its command as it stands, and
// each unit must pass systemd-analyze verify and keep its least privilege.

const deployDir = "../../deploy"

// TestExampleConfigs: every example loads with the command's own config
// loader (unknown or mistyped settings fail), and its addresses, peers,
// queues and policy parse as the command would parse them.
func TestExampleConfigs(t *testing.T) {
	load := func(name string, cmd *cobra.Command, cfg any) {
		t.Helper()
		if err := mergeConfigFile(filepath.Join(deployDir, "examples", name), cfg, cmd.Flags()); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
	}
	var ks keyserverConfig
	load("keyserver.yaml", newKeyserverCmd(IO{}), &ks)
	if ks.Store == "" || ks.Audit == "" || ks.KEKFile == "" || ks.Listen == "" {
		t.Errorf("keyserver.yaml leaves out the store, audit log, KEK or address: %+v", ks)
	}
	if _, err := newLogger(os.Stderr, logSettings{ks.LogFormat, ks.LogLevel}); err != nil {
		t.Errorf("keyserver.yaml: %v", err)
	}

	var ag agentConfig
	load("agent.yaml", newAgentCmd(IO{}), &ag)
	if _, err := parseListen(ag.Listen); err != nil {
		t.Errorf("agent.yaml: %v", err)
	}
	if ag.TUN == "" || ag.Keyserver == "" {
		t.Errorf("agent.yaml leaves out the TUN device or the key service: %+v", ag)
	}
	for _, p := range ag.Peers {
		if _, err := parsePeer(p); err != nil {
			t.Errorf("agent.yaml: %v", err)
		}
	}

	var gw gatewayConfig
	load("gateway.yaml", newGatewayCmd(IO{}), &gw)
	if qs, err := parseQueues(gw.NFQueue); err != nil || len(qs) != 2 {
		t.Errorf("gateway.yaml: queues %v %v", qs, err)
	}
	if _, err := readPolicy(filepath.Join(deployDir, "examples", "policy.yaml")); err != nil {
		t.Errorf("policy.yaml: %v", err)
	}
	for _, a := range []string{ag.Keyserver, gw.Keyserver, ks.Listen} {
		if _, err := netip.ParseAddrPort(a); err != nil {
			t.Errorf("%q: %v", a, err)
		}
	}
}

// TestSystemdUnits: each unit passes systemd-analyze verify (with the
// binary's install path pointed at an executable that exists here), starts
// the command with its example config, and keeps its least privilege.
func TestSystemdUnits(t *testing.T) {
	units, _ := filepath.Glob(filepath.Join(deployDir, "systemd", "*@.service"))
	if len(units) != 3 {
		t.Fatalf("units %v, want the key server's, the agent's and the gateway's", units)
	}
	for _, u := range units {
		raw, err := os.ReadFile(u)
		if err != nil {
			t.Fatal(err)
		}
		s := string(raw)
		for _, want := range []string{"NoNewPrivileges=yes", "ProtectSystem=strict", "CapabilityBoundingSet=", "Restart=on-failure", "User=enclave",
			"LoadCredential=key:/etc/enclave/%i.key", "--cert /etc/enclave/%i.crt", "--key %d/key", "--config /etc/enclave/"} {
			if !strings.Contains(s, want) {
				t.Errorf("%s lacks %s", filepath.Base(u), want)
			}
		}
		if strings.Contains(filepath.Base(u), "keyserver") && !strings.Contains(s, "StateDirectory=enclave") {
			t.Errorf("%s keeps no state directory", filepath.Base(u))
		}
	}
	if _, err := exec.LookPath("systemd-analyze"); err != nil {
		t.Skip("systemd-analyze is not installed (apt-get install systemd); .ci/run installs it")
	}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	var paths []string
	for _, u := range units {
		raw, _ := os.ReadFile(u)
		// A template is verified as an instance of it.
		p := filepath.Join(dir, strings.Replace(filepath.Base(u), "@.", "@test.", 1))
		if err := os.WriteFile(p, []byte(strings.ReplaceAll(string(raw), "/usr/local/bin/enclave", self)), 0o644); err != nil {
			t.Fatal(err)
		}
		paths = append(paths, p)
	}
	out, err := exec.Command("systemd-analyze", append([]string{"verify"}, paths...)...).CombinedOutput()
	if err != nil || len(strings.TrimSpace(string(out))) > 0 {
		t.Fatalf("systemd-analyze verify: %v\n%s", err, out)
	}
}
