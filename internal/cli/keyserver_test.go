package cli

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/enclavekeys/enclave/internal/keys"
	"time"
)

func TestKeyserverConfigFile(t *testing.T) {
	dir := t.TempDir()
	cfgPath := filepath.Join(dir, "ks.yaml")
	os.WriteFile(cfgPath, []byte("ca: from-file.crt\nstore: file.db\ngrace: 2h\n"), 0o600)
	cmd := newKeyserverCmd(IO{})
	if err := cmd.ParseFlags([]string{"--config", cfgPath, "--store", "flag.db"}); err != nil {
		t.Fatal(err)
	}
	var cfg keyserverConfig
	cfg.Store = "flag.db"
	cfg.Grace = time.Hour
	if err := mergeConfigFile(cfgPath, &cfg, cmd.Flags()); err != nil {
		t.Fatal(err)
	}
	if cfg.CA != "from-file.crt" || cfg.Store != "flag.db" || cfg.Grace != 2*time.Hour {
		t.Fatalf("merged %+v: the file fills gaps, flags win", cfg)
	}
	os.WriteFile(cfgPath, []byte("stroe: typo.db\n"), 0o600)
	if err := mergeConfigFile(cfgPath, &cfg, cmd.Flags()); err == nil || !strings.Contains(err.Error(), "stroe") {
		t.Fatalf("unknown key: %v", err)
	}
}

func TestKeyserverUsage(t *testing.T) {
	base := []string{"keyserver", "--ca", "ca.crt", "--cert", "c", "--key", "k"}
	cases := []struct {
		args []string
		want string
	}{
		{[]string{"keyserver"}, "required"},
		{base, "exactly one of --store"},
		{append(base, "--store", "s.db"), "--audit"},
		{append(base, "--etcd", "http://127.0.0.1:1", "--audit", "a.log"), "lives in etcd"},
		{append(base, "--store", "s.db", "--audit", "a", "--tier", "middle"), "tier"},
		{append(base, "--store", "s.db", "--audit", "a", "--tier", "enclave"), "needs --etcd"},
		{append(base, "--store", "s.db", "--audit", "a", "--enclave", "3"), "for --tier enclave"},
		{append(base, "--store", "s.db", "--audit", "a", "--grace", "48h"), "--grace"},
		{append(base, "--store", "s.db", "--audit", "a", "--rotation-interval", "1ms", "--grace", "1ms"), "at least 1m0s"},
		{append(base, "--store", "s.db", "--audit", "a", "--rotation-interval", "1h", "--grace", "1ms"), "at least 5s"},
	}
	for _, c := range cases {
		code, _, stderr := runCLI(c.args...)
		if code != 2 || !strings.Contains(stderr, c.want) {
			t.Errorf("%v: exit %d, %q (want %q)", c.args, code, stderr, c.want)
		}
	}
}

// TestEnclavePeers: --peer J=ADDR reads J under the org's layout (3 is
// 3.0 under 8.8), refuses its own enclave and what is no id.
func TestEnclavePeers(t *testing.T) {
	l, _ := keys.ParseLayout("8.8")
	got, err := enclavePeers([]string{"7=10.0.0.7:7443", "9=10.0.0.9:7443"}, l, 0x0300, false)
	if err != nil || got[0x0700] != "10.0.0.7:7443" || got[0x0900] != "10.0.0.9:7443" {
		t.Fatalf("%v %v", got, err)
	}
	for _, bad := range []string{"3=10.0.0.3:7443", "7.x=a:1", "7", "7="} {
		if _, err := enclavePeers([]string{bad}, l, 0x0300, false); err == nil {
			t.Errorf("--peer %q taken", bad)
		}
	}
	if _, err := enclavePeers([]string{"7.1=a:1"}, keys.Layout{}, 3, true); err != nil {
		t.Errorf("the form of a dotted peer refused before the layout is known: %v", err)
	}
}
