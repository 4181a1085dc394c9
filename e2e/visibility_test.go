package e2e

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestDryRunDiffAndReaders: through the real binary and key server, a dry
// run prints who would gain sight and changes nothing; the same change
// applied makes maps whose --diff says the same; the audit log's replay
// answers who could read the pair before and after, equal to the map.
func TestDryRunDiffAndReaders(t *testing.T) {
	e := newEnv(t)
	ks := e.pairOrg()
	e.issue("edge", "gateway")
	e.ok(e.admin(ks, "device", "add", "--name", "edge", "--role", "gateway")...)
	mapArgs := []string{"map", "--keyserver", ks.addr, "--ca", "ca/ca.crt", "--cert", "certs/alice.crt", "--key", "certs/alice.key", "--format", "json", "--out"}
	e.ok(append(mapArgs, "before.json")...)
	// --at has whole seconds: a moment after every change so far and
	// before the grant below.
	time.Sleep(1100 * time.Millisecond)
	before := time.Now().UTC().Truncate(time.Second)

	dry := e.ok(e.admin(ks, "grant", "add", "--device", "edge", "--pairs", "7-3", "--dry-run")...)
	want := "+ edge (gateway) gains sight of pair 3-7: pair key, by grant"
	if !strings.Contains(dry, "dry run of AddGrant, nothing changed") || !strings.Contains(dry, want) {
		t.Fatalf("dry run:\n%s", dry)
	}
	e.ok(append(mapArgs, "still.json")...)
	if d := e.ok("map", "--diff", "before.json", "still.json", "--format", "text"); !strings.Contains(d, "no change") {
		t.Fatalf("the dry run changed something:\n%s", d)
	}

	e.ok(e.admin(ks, "grant", "add", "--device", "edge", "--pairs", "7-3")...)
	e.ok(append(mapArgs, "after.json")...)
	diff := e.ok("map", "--diff", "before.json", "after.json", "--format", "text")
	if !strings.Contains(dry, diff) {
		t.Fatalf("the applied change's diff\n%s\nis not the dry run's\n%s", diff, dry)
	}
	e.ok("map", "--diff", "before.json", "after.json", "--out", "diff.html")
	page, err := os.ReadFile(filepath.Join(e.dir, "diff.html"))
	if err != nil || !strings.Contains(string(page), `class="edge gained" data-pair="3-7"`) {
		t.Fatalf("the diff page does not mark pair 3-7 gained (%v)", err)
	}

	var m struct {
		Pairs []struct {
			A, B    uint32
			Readers []struct{ Device, Right string }
		}
	}
	raw, err := os.ReadFile(filepath.Join(e.dir, "after.json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(raw, &m); err != nil {
		t.Fatal(err)
	}
	var mapReaders []string
	for _, p := range m.Pairs {
		if p.A == 3 && p.B == 7 {
			for _, r := range p.Readers {
				mapReaders = append(mapReaders, r.Device+"="+r.Right)
			}
		}
	}
	replay := func(args ...string) []string {
		t.Helper()
		out := e.ok(append([]string{"audit", "readers", "--pair", "3-7", "--json", "audit.log"}, args...)...)
		var r struct {
			Readers []struct{ Device, Right string }
		}
		if err := json.Unmarshal([]byte(out), &r); err != nil {
			t.Fatalf("%v: %s", err, out)
		}
		var got []string
		for _, x := range r.Readers {
			got = append(got, x.Device+"="+x.Right)
		}
		return got
	}
	if got := replay(); strings.Join(got, ",") != strings.Join(mapReaders, ",") || !strings.Contains(strings.Join(got, ","), "edge=") {
		t.Fatalf("the log's readers now %q, the map's %q", got, mapReaders)
	}
	if got := replay("--at", before.Format(time.RFC3339)); strings.Contains(strings.Join(got, ","), "edge=") || len(got) == 0 {
		t.Fatalf("readers before the grant: %q", got)
	}
}
