package lab

import (
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/enclavekeys/enclave/internal/visibility"
)

// TestLab runs the whole scenario: every step passes, the report names
// them all with their figures, the kept directory holds what --keep
// promises, and the map says who reads what.
func TestLab(t *testing.T) {
	dir := t.TempDir()
	var progress bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	// The components' log says why a step failed: a rare failure is
	// read from it.
	logs := &syncBuffer{}
	rep, err := Run(ctx, Config{Dir: dir, Seed: 7, Progress: &progress, Log: slog.New(slog.NewTextHandler(logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	rep.Print(&out)
	if !rep.Passed {
		t.Fatalf("the lab failed:\n%s\nthe components' log ends:\n%s", out.String(), tail(logs.String(), 12000))
	}
	if len(rep.Steps) != 13 || strings.Count(progress.String(), "\n") != 13 {
		t.Fatalf("%d steps, progress:\n%s", len(rep.Steps), progress.String())
	}
	for _, st := range rep.Steps {
		if len(st.Figures) == 0 {
			t.Errorf("step %q has no figures", st.Name)
		}
	}
	for _, f := range []string{"ca/ca.crt", "certs/laptop.crt", "ks.db", "audit.log", "gw-web-flows.jsonl"} {
		if _, err := os.Stat(filepath.Join(dir, f)); err != nil {
			t.Errorf("kept directory: %v", err)
		}
	}
	var js bytes.Buffer
	if err := rep.JSON(&js); err != nil || !json.Valid(js.Bytes()) {
		t.Fatalf("JSON: %v", err)
	}
	m, ok := rep.Map.(*visibility.Map)
	if !ok {
		t.Fatal("no map")
	}
	readers := func(a, b uint32) string {
		var s []string
		for _, r := range m.Readers(a, b) {
			s = append(s, r.Device)
		}
		return strings.Join(s, ",")
	}
	if got := readers(1, 2); got != "ks-org,soc,ks-app,gw-web,gw-late,app1,web1" {
		t.Errorf("readers of 1-2: %s", got)
	}
	// Its own enclave key: the org key does not reach it, and soc's
	// org-wide grant reads it only if ks-ops serves it (ks-org does here).
	if got := readers(4, 4); got != "soc,ks-ops,ops1" {
		t.Errorf("readers of 4-4: %s", got)
	}
	for _, r := range m.Readers(4, 4) {
		if (r.Unsure != "") != (r.Device == "soc") {
			t.Errorf("reader %s of 4-4: unsure %q", r.Device, r.Unsure)
		}
	}
	if readers(1, 3) != "" {
		t.Error("the forbidden pair 1-3 has readers")
	}
}

// TestFaults runs the faults scenario: every fault recovers, and the report
// carries each one's figures. (The goals are measured, not asserted: the
// report says met or MISSED, and a loaded machine may miss one.)
func TestFaults(t *testing.T) {
	if testing.Short() {
		t.Skip("runs the faults scenario (about 10 s)")
	}
	rep, err := RunFaults(context.Background(), Config{})
	if err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	rep.Print(&b)
	t.Log(b.String())
	if !rep.Passed || len(rep.Steps) != 7 {
		t.Fatalf("faults: passed %v, %d steps", rep.Passed, len(rep.Steps))
	}
	for _, st := range rep.Steps[1:] {
		figs := map[string]string{}
		for _, f := range st.Figures {
			figs[f.Name] = f.Value
		}
		if figs["datagrams sent"] == "" || figs["datagrams sent"] == "0" {
			t.Errorf("%s: no datagrams sent while it ran: %v", st.Name, figs)
		}
	}
}
