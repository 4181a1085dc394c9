package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
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

	// The dry run of enclave-key mode: a grant reads only where the
	// enclave's own key server serves it.
	whatIf := e.ok("map", "--keyserver", ks.addr, "--ca", "ca/ca.crt", "--cert", "certs/alice.crt", "--key", "certs/alice.key", "--what-if-enclave-key-mode", "3")
	if !strings.Contains(whatIf, "~ edge (gateway) reads pair 3-7 by pair key, by grant (maybe: enclave-key mode: only if the enclave's own key server serves its grant) instead of pair key, by grant") || strings.Contains(whatIf, "web1") {
		t.Fatalf("what if enclave 3 took its own key:\n%s", whatIf)
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

// TestDidRead: enclave map, given the status sockets of running agents and
// gateways, shows what each read of a pair; a gateway granted the pair
// that carried none of it is listed as a candidate to take the grant
// from, the one that relayed it is not.
func TestDidRead(t *testing.T) {
	if _, err := exec.LookPath("curl"); err != nil {
		t.Skip("curl is not installed (apt-get install curl); .ci/run installs it")
	}
	e := newEnv(t)
	ks := e.pairOrg()
	relay := map[string]string{}
	for _, gw := range []string{"edge", "spare"} {
		e.issue(gw, "gateway", "--enclave", "7")
		e.ok(e.admin(ks, "device", "add", "--name", gw, "--role", "gateway", "--enclave", "7")...)
		e.ok(e.admin(ks, "grant", "add", "--device", gw, "--pairs", "3-7")...)
		relay[gw] = fmt.Sprintf("127.0.0.1:%d", freePortPair(t))
		e.spawn("gateway", "--ca", "ca/ca.crt", "--cert", "certs/"+gw+".crt", "--key", "certs/"+gw+".key", "--keyserver", ks.addr,
			"--relay", relay[gw], "--relay-to", "127.0.0.1/32", "--flow-log", gw+".jsonl", "--status-socket", gw+".sock")
	}
	socks, _, _ := e.webAgentsWith(ks.addr, []string{"--status-socket", "server.sock"}, []string{"--status-socket", "client.sock", "--via", relay["edge"]})
	e.curlWeb1(socks)

	args := []string{"map", "--keyserver", ks.addr, "--ca", "ca/ca.crt", "--cert", "certs/alice.crt", "--key", "certs/alice.key",
		"--status", "server.sock", "--status", "client.sock", "--status", "edge.sock", "--status", "spare.sock", "--window", "10m"}
	var m struct {
		Reads []struct {
			Device, Pair string
			Bytes        uint64
		}
		Reported []string
	}
	js := e.ok(append(args, "--format", "json")...)
	if err := json.Unmarshal([]byte(js), &m); err != nil {
		t.Fatal(err)
	}
	read := map[string]uint64{}
	for _, r := range m.Reads {
		read[r.Device+" "+r.Pair] = r.Bytes
	}
	for _, who := range []string{"web1 3-7", "laptop 3-7", "edge 3-7"} {
		if read[who] < uint64(len("hello from web1")) {
			t.Errorf("%s read %d bytes: %+v", who, read[who], m.Reads)
		}
	}
	if _, ok := read["spare 3-7"]; ok || strings.Join(m.Reported, ",") != "edge,laptop,spare,web1" {
		t.Errorf("spare read %d; reported %q", read["spare 3-7"], m.Reported)
	}
	e.ok(append(args, "--out", "map.html")...)
	page, err := os.ReadFile(filepath.Join(e.dir, "map.html"))
	if err != nil {
		t.Fatal(err)
	}
	unread := regexp.MustCompile(`data-unread="([^"]+)"`).FindAllStringSubmatch(string(page), -1)
	if len(unread) != 1 || unread[0][1] != "spare 3-7" {
		t.Fatalf("candidates to take the grant from: %q, want only spare on 3-7", unread)
	}
}
