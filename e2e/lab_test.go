package e2e

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestLabCommand: `enclave lab`, the README's main job, as a user runs it:
// exit 0, a progress line per step on stderr, the report on stdout ending
// with every step passed, and --json, --map and --keep writing what they
// say, in under a minute.
func TestLabCommand(t *testing.T) {
	e := newEnv(t)
	start := time.Now()
	code, out, errOut := e.run("lab", "--json", "report.json", "--map", "map.html", "--keep", "kept", "--seed", "3")
	if code != 0 {
		t.Fatalf("exit %d\n%s\n%s", code, out, errOut)
	}
	if took := time.Since(start); took > time.Minute {
		t.Errorf("the lab took %v", took)
	}
	if !strings.Contains(out, "all steps passed") || strings.Count(errOut, "\n") < 12 || !strings.Contains(errOut, "[12] visibility map: ok") {
		t.Fatalf("report:\n%s\nprogress:\n%s", out, errOut)
	}
	raw, err := os.ReadFile(filepath.Join(e.dir, "report.json"))
	if err != nil {
		t.Fatal(err)
	}
	var rep struct {
		Passed bool  `json:"passed"`
		Seed   int64 `json:"seed"`
		Steps  []struct {
			Name   string `json:"name"`
			Passed bool   `json:"passed"`
		} `json:"steps"`
		Map struct {
			Pairs []struct {
				A, B    uint32
				Readers []struct {
					Device string `json:"device"`
				} `json:"readers"`
			} `json:"pairs"`
		} `json:"map"`
	}
	if err := json.Unmarshal(raw, &rep); err != nil || !rep.Passed || rep.Seed != 3 || len(rep.Steps) != 13 || len(rep.Map.Pairs) != 10 {
		t.Fatalf("report.json: %v\n%.1000s", err, raw)
	}
	page, err := os.ReadFile(filepath.Join(e.dir, "map.html"))
	if err != nil || !strings.Contains(string(page), "<svg") || !strings.Contains(string(page), `data-pair="1-2"`) {
		t.Fatalf("map.html: %v", err)
	}
	for _, f := range []string{"kept/ca/ca.crt", "kept/audit.log", "kept/ks.db", "kept/gw-web-flows.jsonl", "kept/lab.log"} {
		if _, err := os.Stat(filepath.Join(e.dir, f)); err != nil {
			t.Errorf("--keep: %v", err)
		}
	}
	if code, _, _ := e.run("audit", "verify", "kept/audit.log"); code != 0 {
		t.Error("the kept audit log does not verify")
	}
}

// TestLabNetns: `enclave lab --netns` as root: every step passes, and
// nothing it made is left (namespaces, processes).
func TestLabNetns(t *testing.T) {
	needNetns(t)
	iptablesFor(t)
	e := newEnv(t)
	code, out, errOut := e.run("lab", "--netns", "--faults", "--json", "report.json")
	if code != 0 || !strings.Contains(out, "all steps passed") || !strings.Contains(out, "server agent killed") || !strings.Contains(out, "inline gateway restart") {
		t.Fatalf("exit %d\n%s\n%s", code, out, errOut)
	}
	ns, _ := exec.Command("ip", "netns", "list").Output()
	if strings.Contains(string(ns), "enl") {
		t.Fatalf("namespaces left:\n%s", ns)
	}
	if code, _, stderr := e.run("lab", "--netns", "--map", "m.html"); code != 2 || !strings.Contains(stderr, "--map") {
		t.Fatalf("--netns --map: exit %d %s", code, stderr)
	}
}

// TestLabFaultsCommand: `enclave lab --faults --json` runs the failure
// model and writes each fault's figures.
func TestLabFaultsCommand(t *testing.T) {
	e := newEnv(t)
	code, out, errOut := e.run("lab", "--faults", "--json", "faults.json")
	if code != 0 || !strings.Contains(out, "all steps passed") || !strings.Contains(out, "server restart") {
		t.Fatalf("exit %d\n%s\n%s", code, out, errOut)
	}
	raw, err := os.ReadFile(filepath.Join(e.dir, "faults.json"))
	if err != nil {
		t.Fatal(err)
	}
	var rep struct {
		Passed bool `json:"passed"`
		Steps  []struct {
			Name    string `json:"name"`
			Figures []struct {
				Name, Value string
			} `json:"figures"`
		} `json:"steps"`
	}
	if err := json.Unmarshal(raw, &rep); err != nil || !rep.Passed || len(rep.Steps) != 7 {
		t.Fatalf("faults.json: %v\n%.1000s", err, raw)
	}
	if code, _, errOut := e.run("lab", "--faults", "--map", "x.html"); code != 2 || !strings.Contains(errOut, "--map") {
		t.Fatalf("--faults with --map: exit %d: %s", code, errOut)
	}
}
