package e2e

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// TestREADME runs the README's shell blocks, in order, in one bash script
// in a scratch directory, with the binary built for these tests first on
// PATH. A line annotated `# => TEXT` must print TEXT (stdout or stderr),
// `# exit N` must exit N, and every other command must exit 0. A block
// right after an HTML comment starting "<!-- not run by the README test"
// is skipped (the set-up block: it is what runs this test). The README's own
// `go build -o enclave` and `export PATH=` lines are skipped: the test has
// built the binary and set PATH.
func TestREADME(t *testing.T) {
	for _, tool := range []string{"bash", "curl", "grep"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s is not installed (the README's walkthrough uses it; .ci/run installs curl)", tool)
		}
	}
	script, n := readmeScript(t, "../README.md")
	if n == 0 {
		t.Fatal("no runnable commands found in README.md")
	}
	dir := t.TempDir()
	path := filepath.Join(dir, "readme.sh")
	if err := os.WriteFile(path, []byte(script), 0o600); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "bash", path)
	cmd.Dir = ".."
	cmd.Env = append(os.Environ(), "PATH="+filepath.Dir(binary)+string(os.PathListSeparator)+os.Getenv("PATH"), "TMPDIR="+dir)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("README walkthrough failed (%v):\n%s", err, out)
	}
	t.Logf("%d README commands ran and matched", n)
}

var (
	exitRE   = regexp.MustCompile(`\bexit (\d+)\b`)
	expectRE = regexp.MustCompile(`=> (.*)$`)
)

// readmeScript turns the README's runnable shell blocks into one bash
// script with a check after every command; n counts the commands.
func readmeScript(t *testing.T, readme string) (script string, n int) {
	t.Helper()
	f, err := os.Open(readme)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var b strings.Builder
	b.WriteString("set -u\n")
	b.WriteString("trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null' EXIT\n")
	b.WriteString("fail() { printf 'README.md line %s: %s\\n' \"$1\" \"$2\" >&2; exit 1; }\n")
	sc := bufio.NewScanner(f)
	line, inBlock, skip, prevComment := 0, false, false, false
	var pending string
	var pendingLine int
	for sc.Scan() {
		line++
		text := sc.Text()
		switch {
		case !inBlock && strings.HasPrefix(text, "```sh"):
			inBlock, skip = true, prevComment
			continue
		case !inBlock:
			if strings.TrimSpace(text) != "" {
				prevComment = strings.HasPrefix(text, "<!-- not run by the README test")
			}
			continue
		case text == "```":
			inBlock, prevComment = false, false
			continue
		case skip:
			continue
		}
		if pending == "" {
			pendingLine = line
		}
		if cont, ok := strings.CutSuffix(text, "\\"); ok {
			pending += cont + " "
			continue
		}
		cmd := strings.TrimSpace(pending + text)
		pending = ""
		if cmd == "" || strings.HasPrefix(cmd, "#") || strings.HasPrefix(cmd, "go build -o enclave") || strings.HasPrefix(cmd, "export PATH=") {
			continue
		}
		n++
		b.WriteString(checked(cmd, pendingLine))
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return b.String(), n
}

// checked is the bash for one README command and its check.
func checked(cmd string, line int) string {
	code, comment := cmd, ""
	if i := strings.Index(cmd, " # "); i >= 0 {
		code, comment = strings.TrimSpace(cmd[:i]), cmd[i+3:]
	}
	if strings.HasSuffix(code, "&") {
		return code + "\n"
	}
	want := "0"
	if m := exitRE.FindStringSubmatch(comment); m != nil {
		want = m[1]
	}
	sub := ""
	if m := expectRE.FindStringSubmatch(comment); m != nil {
		sub = strings.TrimSpace(m[1])
	}
	q := func(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }
	if sub == "" && want == "0" {
		return fmt.Sprintf("%s\n__rc=$?; [ \"$__rc\" = 0 ] || fail %d \"exit $__rc: \"%s\n", code, line, q(code))
	}
	var b strings.Builder
	fmt.Fprintf(&b, "__out=$( { %s ; } 2>&1 ); __rc=$?\n", code)
	fmt.Fprintf(&b, "[ \"$__rc\" = %s ] || fail %d \"exit $__rc (want %s): $__out\"\n", want, line, want)
	if sub != "" {
		fmt.Fprintf(&b, "case \"$__out\" in *%s*) ;; *) fail %d \"output lacks \"%s\": $__out\";; esac\n", q(sub), line, q(sub))
	}
	return b.String()
}
