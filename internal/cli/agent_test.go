package cli

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestAgentUsage(t *testing.T) {
	dir := t.TempDir()
	caDir, out := filepath.Join(dir, "ca"), filepath.Join(dir, "certs")
	runCLI("ca", "init", "--dir", caDir, "--org", "example.org")
	runCLI("cert", "issue", "--ca", caDir, "--name", "c", "--role", "client", "--enclave", "7", "--out", out)
	runCLI("cert", "issue", "--ca", caDir, "--name", "o", "--role", "client", "--enclave", "7", "--ip", "100.64.7.1/16", "--out", out)
	runCLI("cert", "issue", "--ca", caDir, "--name", "s", "--role", "server", "--enclave", "3", "--server-id", "1", "--ip", "100.64.3.1/16", "--out", out)
	runCLI("cert", "issue", "--ca", caDir, "--name", "g", "--role", "gateway", "--enclave", "3", "--ip", "100.64.3.9/16", "--out", out)
	creds := func(name string) []string {
		return []string{"agent", "--ca", filepath.Join(caDir, "ca.crt"), "--cert", filepath.Join(out, name+".crt"), "--key", filepath.Join(out, name+".key")}
	}
	cases := []struct {
		args []string
		want string
	}{
		{[]string{"agent"}, "required"},
		{creds("o"), "one data path"},
		{append(creds("o"), "--netstack", "--tun", "enc0"), "one data path"},
		{append(creds("o"), "--tun", "enc0", "--socks5", "127.0.0.1:1080"), "for --netstack"},
		{append(creds("o"), "--netstack", "--mtu", "100"), "--mtu"},
		{append(creds("o"), "--netstack", "--listen", "nowhere"), "--listen"},
		{append(creds("o"), "--netstack", "--peer", "100.64.3.0/24"), "PREFIX=HOST"},
		{append(creds("o"), "--netstack", "--peer", "100.64.3.0/24=example.org:1000"), "IP address"},
		{append(creds("o"), "--netstack", "--expose", "80"), "PORT=HOST:PORT"},
		{append(creds("g"), "--netstack", "--keyserver", "127.0.0.1:1"), "for servers"},
		{append(creds("s"), "--netstack"), "needs --keyserver"},
		{append(creds("c"), "--netstack", "--listen", "127.0.0.1:0"), "overlay address"},
		{append(creds("o"), "--netstack", "--enclave", "0"), "reserved"},
	}
	for _, c := range cases {
		code, _, stderr := runCLI(c.args...)
		if code != 2 || !strings.Contains(stderr, c.want) {
			t.Errorf("%v: exit %d %q (want %q)", c.args[len(c.args)-1], code, stderr, c.want)
		}
	}
}

func TestAgentConfigFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "agent.yaml")
	os.WriteFile(path, []byte("netstack: true\nlisten: 127.0.0.2:11000\npeer: [\"100.64.3.0/24=127.0.0.3:11000\"]\nlifetime: 30m\nenclave: 7\n"), 0o600)
	cmd := newAgentCmd(IO{})
	if err := cmd.ParseFlags([]string{"--config", path, "--listen", "127.0.0.9:1000"}); err != nil {
		t.Fatal(err)
	}
	cfg := agentConfig{Listen: "127.0.0.9:1000"}
	if err := mergeConfigFile(path, &cfg, cmd.Flags()); err != nil {
		t.Fatal(err)
	}
	if !cfg.Netstack || cfg.Listen != "127.0.0.9:1000" || len(cfg.Peers) != 1 || cfg.Lifetime != 30*time.Minute || cfg.Enclave != 7 {
		t.Fatalf("merged %+v", cfg)
	}
	os.WriteFile(path, []byte("netstak: true\n"), 0o600)
	if err := mergeConfigFile(path, &cfg, cmd.Flags()); err == nil || !strings.Contains(err.Error(), "netstak") {
		t.Fatalf("unknown key: %v", err)
	}
	if r, err := parsePeer("100.64.3.7=127.0.0.3"); err != nil || r.Prefix.Bits() != 32 || r.Endpoint.Port() != 1000 {
		t.Fatalf("a single address without a port: %+v %v", r, err)
	}
}
