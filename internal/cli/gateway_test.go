package cli

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/enclavekeys/enclave/internal/keys"
)

func TestGatewayUsage(t *testing.T) {
	dir := t.TempDir()
	caDir, out := filepath.Join(dir, "ca"), filepath.Join(dir, "certs")
	runCLI("ca", "init", "--dir", caDir, "--org", "example.org")
	runCLI("cert", "issue", "--ca", caDir, "--name", "g", "--role", "gateway", "--enclave", "1", "--out", out)
	runCLI("cert", "issue", "--ca", caDir, "--name", "c", "--role", "client", "--enclave", "1", "--out", out)
	policy := filepath.Join(dir, "policy.yaml")
	os.WriteFile(policy, []byte("deny: [{proto: tcp, dst_port: 99999}]\n"), 0o600)
	creds := func(name string) []string {
		return []string{"gateway", "--ca", filepath.Join(caDir, "ca.crt"), "--cert", filepath.Join(out, name+".crt"), "--key", filepath.Join(out, name+".key"), "--keyserver", "127.0.0.1:1"}
	}
	cases := []struct {
		args []string
		want string
	}{
		{[]string{"gateway"}, "required"},
		{creds("g"), "one mode"},
		{append(creds("g"), "--relay", "127.0.0.1:7000", "--nfqueue", "0"), "one mode"},
		{append(creds("g"), "--relay", "nowhere"), "--relay"},
		{append(creds("g"), "--nfqueue", "0,x"), "--nfqueue"},
		{append(creds("g"), "--nfqueue", "5-2"), "--nfqueue"},
		{append(creds("g"), "--relay", "127.0.0.1:7000", "--data-port", "65535"), "--data-port"},
		{append(creds("g"), "--relay", "127.0.0.1:7000", "--flow-idle", "1ms"), "--flow-idle"},
		{append(creds("g"), "--relay", "127.0.0.1:7000", "--policy", policy), "dst_port"},
		{append(creds("c"), "--relay", "127.0.0.1:7000"), "role gateway"},
		{append(creds("g"), "--relay", "127.0.0.1:7000", "--relay-to", "10.0.0.0/33"), "--relay-to"},
		{append(creds("g"), "--nfqueue", "0", "--relay-to", "10.0.0.0/8"), "for --relay"},
	}
	for _, c := range cases {
		code, _, stderr := runCLI(c.args...)
		if code != 2 || !strings.Contains(stderr, c.want) {
			t.Errorf("%v: exit %d %q (want %q)", c.args[len(c.args)-1], code, stderr, c.want)
		}
	}
	if code, _, stderr := runCLI(append(creds("g"), "--relay", "127.0.0.1:7000", "--policy", filepath.Join(dir, "none.yaml"))...); code != 2 || !strings.Contains(stderr, "--policy") {
		t.Errorf("missing policy file: exit %d %q", code, stderr)
	}
	if q, err := parseQueues("0,2-4"); err != nil || !slices.Equal(q, []uint16{0, 2, 3, 4}) {
		t.Errorf("queues %v %v", q, err)
	}
	if _, err := parseQueues("0-100"); err == nil {
		t.Error("100 queues taken")
	}
}

func TestMapUsage(t *testing.T) {
	dir := t.TempDir()
	bad := filepath.Join(dir, "flows.jsonl")
	os.WriteFile(bad, []byte(`{"vc":"3,7","spi":"80001234"}`+"\n"), 0o600)
	conn := []string{"map", "--keyserver", "127.0.0.1:1", "--ca", "x", "--cert", "y", "--key", "z"}
	for _, c := range []struct {
		args []string
		want string
	}{
		{append(conn, "--format", "svg"), "--format"},
		{append(conn, "--flows", filepath.Join(dir, "none")), "--flows"},
		{append(conn, "--flows", bad), "line 1"},
		{[]string{"map"}, "required"},
	} {
		code, _, stderr := runCLI(c.args...)
		if code != 2 || !strings.Contains(stderr, c.want) {
			t.Errorf("%v: exit %d %q (want %q)", c.args[len(c.args)-1], code, stderr, c.want)
		}
	}
	good := filepath.Join(dir, "good.jsonl")
	os.WriteFile(good, []byte(`{"vc":"3,7,258","spi":"80001234"}`+"\n"+`{"vc":"3,7,258","spi":"80001234"}`+"\n"), 0o600)
	if src, err := readFlows(good); err != nil || len(src.observed) != 1 || src.observed[0].Server != 258 || src.observed[0].SPI != 0x80001234 || len(src.reads) != 0 {
		t.Fatalf("%+v %v", src, err)
	}
	// Lines that name their gateway (or NAME=FILE for those that do not)
	// tell what it read, by pair.
	named := filepath.Join(dir, "named.jsonl")
	os.WriteFile(named, []byte(`{"gateway":"gw-a","vc":"3,7,258","spi":"80001234","pair":"3-7","bytes":100,"last":"2026-12-02T10:00:00Z"}`+"\n"+
		`{"vc":"3,7,258","spi":"80001235","pair":"3-7","bytes":50,"last":"2026-12-02T10:01:00Z"}`+"\n"), 0o600)
	src, err := readFlows(named)
	if err != nil || len(src.observed) != 2 || !slices.Equal(src.gateways, []string{"gw-a"}) ||
		len(src.reads) != 2 || src.reads[0].Device != "gw-a" || src.reads[1].Device != "gw-a" || src.reads[1].Bytes != 50 ||
		!strings.HasPrefix(src.reads[0].Source, "flow log ") {
		t.Fatalf("%+v %v", src, err)
	}
	// One file is one gateway's (issue 31): NAME= and its lines must
	// agree, and so must its lines; a line's pair must be its VC's; a last
	// packet in the future is refused.
	for _, c := range []struct {
		name, arg, body, want string
	}{
		{"NAME= against the lines", "gw-b=", `{"gateway":"gw-a","vc":"3,7,258","spi":"80001234","pair":"3-7","bytes":1,"last":"2026-12-02T10:00:00Z"}`, "the file is \"gw-b\"'s"},
		{"two gateways in one file", "", `{"gateway":"gw-a","vc":"3,7,258","spi":"80001234","pair":"3-7","bytes":1,"last":"2026-12-02T10:00:00Z"}` + "\n" +
			`{"gateway":"gw-c","vc":"3,7,258","spi":"80001234","pair":"3-7","bytes":1,"last":"2026-12-02T10:00:00Z"}`, "line 2: written by gateway \"gw-c\""},
		{"a last packet in the future", "", `{"gateway":"gw-a","vc":"3,7,258","spi":"80001234","pair":"3-7","bytes":1,"last":"2099-01-01T00:00:00Z"}`, "in the future"},
	} {
		f := filepath.Join(dir, "lie.jsonl")
		os.WriteFile(f, []byte(c.body+"\n"), 0o600)
		if _, err := readFlows(c.arg + f); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want %q", c.name, err, c.want)
		}
	}
	// A line's pair must be its VC's, named plainly or dotted under the
	// org's layout (a gateway of a sub-enclave org writes 3.1-7).
	l88, _ := keys.ParseLayout("8.8")
	for _, c := range []struct {
		name, body string
		l          keys.Layout
		want       string // error, or the pair the read is named by
	}{
		{"a pair that is not the VC's", `{"gateway":"gw-a","vc":"3,7,258","spi":"80001234","pair":"3-9","bytes":1,"last":"2026-12-02T10:00:00Z"}`, keys.Layout{}, "but its VC is of pair 3-7"},
		{"dotted under the layout", `{"gateway":"gw-a","vc":"769,1792,31","spi":"80001234","pair":"3.1-7","bytes":1,"last":"2026-12-02T10:00:00Z"}`, l88, "3.1-7"},
		{"plain numbers under the layout", `{"gateway":"gw-a","vc":"769,1792,31","spi":"80001234","pair":"769-1792","bytes":1,"last":"2026-12-02T10:00:00Z"}`, l88, "3.1-7"},
		{"dotted, another pair", `{"gateway":"gw-a","vc":"769,1792,31","spi":"80001234","pair":"3.2-7","bytes":1,"last":"2026-12-02T10:00:00Z"}`, l88, "but its VC is of pair 3.1-7"},
	} {
		f := filepath.Join(dir, "pair.jsonl")
		os.WriteFile(f, []byte(c.body+"\n"), 0o600)
		src, err := readFlows(f)
		if err == nil {
			err = src.check(c.l)
		}
		switch {
		case err != nil && !strings.Contains(err.Error(), c.want):
			t.Errorf("%s: %v, want %q", c.name, err, c.want)
		case err == nil && src.reads[0].Pair != c.want:
			t.Errorf("%s: read of pair %q, want %q", c.name, src.reads[0].Pair, c.want)
		}
	}
}
