package cli

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/enclavekeys/enclave/internal/keys"
)

const (
	designOK = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
	designEK = "fb96994d8420bbb6e8afbf09c1d2bf15e7fc77f478aa0ea457e0acb4454a3529"
	designSK = "9192dff597d48617d695adafb93333ba50ba77e90d81e36d9723defbef70a9ae"
	designV1 = "9bd253cc0a1a23bb1960342d4073736a70e5ac3eb0bb0ba7924bac4dea4c800e"
	designV0 = "482374798d527e3fbc40b6026486b8d5"
)

func runCLI(args ...string) (code int, stdout, stderr string) {
	var out, errb bytes.Buffer
	code = Main(args, IO{In: strings.NewReader(""), Out: &out, Err: &errb})
	return code, out.String(), errb.String()
}

func TestKeysDerive(t *testing.T) {
	dir := t.TempDir()
	keyFile := filepath.Join(dir, "ok.hex")
	if err := os.WriteFile(keyFile, []byte(designOK+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	org := []string{"keys", "derive", "--org-key", designOK}
	tests := []struct {
		name   string
		args   []string
		code   int
		stdout string // exact, when code is 0
		stderr string // substring, when code is not 0
	}{
		{"design SA key", append(org, "--enclaves", "3,7", "--generation", "1", "--server", "258", "--spi", "80001234"), 0, designV1 + "\n", ""},
		{"design SA key v0", append(org, "--enclaves", "3,7", "--generation", "1", "--server", "258", "--spi", "80001234", "--psp-version", "0"), 0, designV0 + "\n", ""},
		{"pair key", append(org, "--enclaves", "7,3", "--generation", "1"), 0, designEK + "\n", ""},
		{"server key", append(org, "--enclaves", "3,7", "--generation", "1", "--server", "258"), 0, designSK + "\n", ""},
		{"key from file", []string{"keys", "derive", "--org-key", "@" + keyFile, "--enclaves", "3,7", "--generation", "1"}, 0, designEK + "\n", ""},
		{"from pair key", []string{"keys", "derive", "--pair-key", designEK, "--enclaves", "3,7", "--server", "258", "--spi", "80001234"}, 0, designV1 + "\n", ""},
		{"from pair key, upper case", []string{"keys", "derive", "--pair-key", strings.ToUpper(designEK), "--enclaves", "3,7", "--server", "258"}, 0, designSK + "\n", ""},
		{"from server key", []string{"keys", "derive", "--server-key", designSK, "--spi", "80001234", "--generation", "1"}, 0, designV1 + "\n", ""},

		{"bad hex", []string{"keys", "derive", "--org-key", designOK[:63] + "z", "--enclaves", "3,7", "--generation", "1"}, 2, "", "malformed"},
		{"short key", []string{"keys", "derive", "--org-key", "0011", "--enclaves", "3,7", "--generation", "1"}, 2, "", "32 bytes"},
		{"missing key file", []string{"keys", "derive", "--org-key", "@" + filepath.Join(dir, "none"), "--enclaves", "3,7", "--generation", "1"}, 2, "", "no such file"},
		{"enclave 0", append(org, "--enclaves", "0,7", "--generation", "1"), 2, "", "enclave id 0 is reserved"},
		{"one enclave", append(org, "--enclaves", "3", "--generation", "1"), 2, "", "I,J"},
		{"enclave too big", append(org, "--enclaves", "3,70000", "--generation", "1"), 2, "", "1 to 65535"},
		{"spi index 0", append(org, "--enclaves", "3,7", "--generation", "1", "--server", "1", "--spi", "80000000"), 2, "", "index"},
		{"spi not 8 digits", append(org, "--enclaves", "3,7", "--generation", "1", "--server", "1", "--spi", "1234"), 2, "", "8 hex digits"},
		{"parity", append(org, "--enclaves", "3,7", "--generation", "2", "--server", "258", "--spi", "80001234"), 2, "", "parity"},
		{"parity at server level", []string{"keys", "derive", "--server-key", designSK, "--spi", "00001234", "--generation", "1"}, 2, "", "parity"},
		{"two starting keys", []string{"keys", "derive", "--org-key", designOK, "--pair-key", designEK, "--enclaves", "3,7", "--generation", "1"}, 2, "", "only one key"},
		{"no starting key", []string{"keys", "derive", "--enclaves", "3,7"}, 2, "", "the key to start from"},
		{"org without generation", append(org, "--enclaves", "3,7"), 2, "", "--generation"},
		{"org without enclaves", append(org, "--generation", "1"), 2, "", "--enclaves"},
		{"pair without server", []string{"keys", "derive", "--pair-key", designEK, "--enclaves", "3,7"}, 2, "", "--server"},
		{"spi without server", append(org, "--enclaves", "3,7", "--generation", "1", "--spi", "80001234"), 2, "", "--server"},
		{"server key with enclaves", []string{"keys", "derive", "--server-key", designSK, "--enclaves", "3,7", "--spi", "80001234"}, 2, "", "do not apply"},
		{"server key without spi", []string{"keys", "derive", "--server-key", designSK}, 2, "", "--spi"},
		{"version 2", append(org, "--enclaves", "3,7", "--generation", "1", "--server", "1", "--spi", "80001234", "--psp-version", "2"), 2, "", "PSP version"},
		{"version without spi", append(org, "--enclaves", "3,7", "--generation", "1", "--psp-version", "0"), 2, "", "only with --spi"},
		{"bad generation", append(org, "--enclaves", "3,7", "--generation", "x"), 2, "", "generation"},
		{"unknown flag", []string{"keys", "derive", "--nope"}, 2, "", "unknown flag"},
		{"stray argument", append(org, "--enclaves", "3,7", "--generation", "1", "extra"), 2, "", "no arguments"},
		{"unknown command", []string{"nope"}, 2, "", "unknown command"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			code, stdout, stderr := runCLI(tt.args...)
			if code != tt.code {
				t.Fatalf("exit %d, want %d (stdout %q, stderr %q)", code, tt.code, stdout, stderr)
			}
			if tt.code == 0 {
				if stdout != tt.stdout || stderr != "" {
					t.Fatalf("stdout %q stderr %q, want stdout %q", stdout, stderr, tt.stdout)
				}
				return
			}
			if stdout != "" {
				t.Errorf("stdout %q on error, want nothing", stdout)
			}
			if strings.Count(stderr, "\n") != 1 || !strings.Contains(stderr, tt.stderr) {
				t.Errorf("stderr %q, want one line containing %q", stderr, tt.stderr)
			}
			for _, secret := range []string{designOK, designEK, designSK} {
				if strings.Contains(strings.ToLower(stderr), secret[:20]) {
					t.Errorf("error message echoes key bytes: %q", stderr)
				}
			}
		})
	}
}

func TestKeysDeriveJSON(t *testing.T) {
	code, stdout, stderr := runCLI("keys", "derive", "--org-key", designOK, "--enclaves", "3,7",
		"--generation", "1", "--server", "258", "--spi", "80001234", "--json")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	var got map[string]string
	if err := json.Unmarshal([]byte(stdout), &got); err != nil {
		t.Fatal(err)
	}
	want := map[string]string{"pair_key": designEK, "server_key": designSK, "sa_key": designV1}
	if len(got) != len(want) {
		t.Fatalf("got %v, want %v", got, want)
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s = %q, want %q", k, got[k], v)
		}
	}
	// From the pair key only the lower levels appear.
	_, stdout, _ = runCLI("keys", "derive", "--pair-key", designEK, "--enclaves", "3,7", "--server", "258", "--json")
	if strings.TrimSpace(stdout) != `{"server_key":"`+designSK+`"}` {
		t.Errorf("pair-level JSON = %s", stdout)
	}
}

func TestKeysGenerate(t *testing.T) {
	code, a, _ := runCLI("keys", "generate")
	_, b, _ := runCLI("keys", "generate")
	hex64 := regexp.MustCompile(`^[0-9a-f]{64}\n$`)
	if code != 0 || !hex64.MatchString(a) || !hex64.MatchString(b) || a == b {
		t.Fatalf("generate printed %q and %q (exit %d)", a, b, code)
	}
	path := filepath.Join(t.TempDir(), "org.key")
	if code, out, stderr := runCLI("keys", "generate", "--out", path); code != 0 || out != "" {
		t.Fatalf("--out: exit %d, stdout %q, stderr %q", code, out, stderr)
	}
	st, err := os.Stat(path)
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("key file: %v, mode %v", err, st.Mode())
	}
	data, _ := os.ReadFile(path)
	if _, err := keys.ParseKey(string(data)); err != nil {
		t.Fatalf("key file does not parse: %v", err)
	}
	// The file is usable as @FILE and is never overwritten.
	if code, _, stderr := runCLI("keys", "derive", "--org-key", "@"+path, "--enclaves", "1,2", "--generation", "0"); code != 0 {
		t.Fatalf("derive from generated file: %s", stderr)
	}
	if code, _, stderr := runCLI("keys", "generate", "--out", path); code != 1 || !strings.Contains(stderr, "never overwritten") {
		t.Fatalf("overwrite: exit %d, %q", code, stderr)
	}
	after, _ := os.ReadFile(path)
	if !bytes.Equal(after, data) {
		t.Fatal("existing key file changed")
	}
	if code, _, _ := runCLI("keys", "generate", "extra"); code != 2 {
		t.Fatalf("generate with an argument: exit %d, want 2", code)
	}
}

// TestBinary runs the real enclave binary, as a user would.
func TestBinary(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	bin := filepath.Join(t.TempDir(), "enclave")
	build := exec.Command("go", "build", "-o", bin, "github.com/enclavekeys/enclave/cmd/enclave")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	out, err := exec.Command(bin, "keys", "derive", "--org-key", designOK, "--enclaves", "3,7",
		"--generation", "1", "--server", "258", "--spi", "80001234").Output()
	if err != nil || string(out) != designV1+"\n" {
		t.Fatalf("derive: %q, %v", out, err)
	}
	out, err = exec.Command(bin, "packet", "open", "--org-key", designOK, "--generation", "1", designPacket).Output()
	if err != nil || string(out) != designInner+"\n" {
		t.Fatalf("packet open: %q, %v", out, err)
	}
	cmd := exec.Command(bin, "keys", "derive", "--org-key", "xyz")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	err = cmd.Run()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 2 || !strings.HasPrefix(stderr.String(), "enclave: ") {
		t.Fatalf("bad input: %v, stderr %q", err, stderr.String())
	}
}

func FuzzParseEnclavePair(f *testing.F) {
	for _, s := range []string{"3,7", "7,3", "0,1", "1,", ",", "65535,65535", "3,7,9", " 3, 7"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, text string) {
		i, j, err := parseEnclavePair(keys.Layout{}, text)
		if err == nil && (i == 0 || j == 0) {
			t.Fatalf("parseEnclavePair(%q) = %d,%d", text, i, j)
		}
	})
}

// hexRun matches text that could be key material; no error message holds one.
var hexRun = regexp.MustCompile(`^[0-9a-fA-F]{16,}$`)

func FuzzReadKeyFlag(f *testing.F) {
	f.Add(designOK)
	f.Add("@/nonexistent")
	f.Add("")
	f.Fuzz(func(t *testing.T, text string) {
		if strings.HasPrefix(text, "@") {
			return // file paths: not fuzzed into the file system
		}
		k, err := readKeyFlag("--org-key", text)
		if err == nil && k.Hex() != strings.ToLower(strings.TrimSpace(text)) {
			t.Fatalf("readKeyFlag(%q) round trip failed", text)
		}
		if err != nil && hexRun.MatchString(text) && strings.Contains(err.Error(), text) {
			t.Fatalf("error echoes the key text: %v", err)
		}
	})
}

// TestDeriveLayout (issue 33, part 1): keys derive --layout takes dotted
// ids, lists every level's pair key in JSON and reaches DESIGN §3a's
// vectors; --level stops at a pair key, or says which level --pair-key
// is; bad layouts and levels are usage errors.
func TestDeriveLayout(t *testing.T) {
	const ok = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
	code, out, stderr := runCLI("keys", "derive", "--org-key", ok, "--layout", "8.8", "--enclaves", "3.2,7.1", "--generation", "1", "--server", "258", "--spi", "80001234", "--json")
	if code != 0 || !strings.Contains(out, `{"level":2,"key":"98a298449486408063f28959f2cfdb75475012b61e50922f131de3d3f2a09809"}`) ||
		!strings.Contains(out, `"sa_key":"53ea7290363b014097f1e6a1add18dd3cb1bbc6a4f1e1c2b0b421ab334ef9432"`) {
		t.Fatalf("exit %d\n%s%s", code, out, stderr)
	}
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"--org-key", ok, "--layout", "8.8", "--enclaves", "3.2,7.1", "--generation", "1", "--level", "1"}, "5104989dd730ca509c001b43b238bfa5060ad2b3f052ca459959c2cf12a8a1fe"},
		{[]string{"--pair-key", "5104989dd730ca509c001b43b238bfa5060ad2b3f052ca459959c2cf12a8a1fe", "--layout", "8.8", "--level", "1", "--enclaves", "7.1,3.2", "--server", "9"}, "9abd1b44edc9a591da50487413eadc7ee28f87b9b3652fea52221f0de213557e"},
		{[]string{"--org-key", ok, "--layout", "6.5.5", "--enclaves", "5.3.1,5.3.2", "--generation", "1", "--server", "7", "--spi", "80001234"}, "6ea68559671fedc9e4ef09763f66b64389319128336950517e297f0c5da89cd4"},
	} {
		if code, out, stderr := runCLI(append([]string{"keys", "derive"}, c.args...)...); code != 0 || strings.TrimSpace(out) != c.want {
			t.Errorf("%v: exit %d %q %s", c.args, code, out, stderr)
		}
	}
	for _, args := range [][]string{
		{"--org-key", ok, "--layout", "8.9", "--enclaves", "3,7", "--generation", "1"},
		{"--org-key", ok, "--layout", "8.8", "--enclaves", "3.256,7", "--generation", "1"},
		{"--org-key", ok, "--layout", "8.8", "--enclaves", "3,7", "--generation", "1", "--level", "3"},
		{"--org-key", ok, "--layout", "8.8", "--enclaves", "3,7", "--generation", "1", "--level", "1", "--server", "9"},
	} {
		if code, _, _ := runCLI(append([]string{"keys", "derive"}, args...)...); code != 2 {
			t.Errorf("%v: exit %d, want 2", args, code)
		}
	}
}
