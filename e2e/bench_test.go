package e2e

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"
)

// TestBenchSASCommand: `enclave bench sas` as a user runs it, small: every
// SA up on the server, one hierarchy key, no key-service request per
// handshake, the rotation at one key fetch
// with every SA re-established, the sample's pings counted (any lost
// listed with their SA), and the table form naming each figure.
func TestBenchSASCommand(t *testing.T) {
	e := newEnv(t)
	code, out, errOut := e.run("bench", "sas", "--count", "300", "--duration", "500ms", "--json")
	if code != 0 {
		t.Fatalf("exit %d\n%s\n%s", code, out, errOut)
	}
	var rep struct {
		Count      int                `json:"count"`
		Rate       float64            `json:"handshakes_per_second"`
		ServerSAs  float64            `json:"server_sas"`
		HeapPerSA  float64            `json:"server_heap_bytes_per_sa"`
		Keys       float64            `json:"server_hierarchy_keys"`
		Fetches    float64            `json:"rotation_key_service_requests"`
		Requests   map[string]float64 `json:"server_key_service_requests"`
		Rekeyed    int                `json:"rotation_sas_reestablished"`
		Sent       int64              `json:"sample_pings_sent"`
		Lost       int64              `json:"sample_pings_lost"`
		LostDetail []struct {
			SA  int    `json:"sa"`
			SPI string `json:"spi"`
		} `json:"sample_pings_lost_detail"`
	}
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	switch {
	case rep.Count != 300 || rep.ServerSAs != 300 || rep.Rate <= 0 || rep.HeapPerSA <= 0:
		t.Fatalf("build-up: %s", out)
	case rep.Keys != 1 || rep.Fetches != 1 || rep.Rekeyed != 300:
		t.Fatalf("rotation: %s", out)
	case rep.Requests["GetServerKeys"] != 2: // at start and at the rotation: none per handshake
		t.Fatalf("key-service requests: %s", out)
	case rep.Sent < 100*25: // 100 sample SAs at 50/s for well over half a second
		t.Fatalf("pings: %s", out)
	case rep.Lost*100 > rep.Sent || len(rep.LostDetail) != int(min(rep.Lost, 20)):
		t.Fatalf("pings lost: %s", out)
	}
	code, out, errOut = e.run("bench", "sas", "--count", "100")
	if code != 0 {
		t.Fatalf("exit %d\n%s\n%s", code, out, errOut)
	}
	for _, want := range []string{"handshakes/s", "server memory", "hierarchy keys held    1", "rotation               1 key-service request(s); 100 of 100", "sample pings"} {
		if !strings.Contains(out, want) {
			t.Fatalf("the table lacks %q:\n%s", want, out)
		}
	}
}

// TestBenchRegistryCommand: `enclave bench registry`, small: every figure
// reported, the goals judged, the table naming them. Whether the goals
// are met is a timing on a shared machine, no verdict for a test
// (TestGoalsMet checks what --check does with them).
func TestBenchRegistryCommand(t *testing.T) {
	e := newEnv(t)
	code, out, errOut := e.run("bench", "registry", "--devices", "1000", "--sample", "50", "--json")
	if code != 0 {
		t.Fatalf("exit %d\n%s\n%s", code, out, errOut)
	}
	var rep struct {
		Devices int     `json:"devices"`
		Ratio   float64 `json:"add_ratio"`
		Last    struct {
			P50 float64 `json:"p50_ms"`
			CPU float64 `json:"server_cpu_ms_per_add"`
		} `json:"add_at_n"`
		Restart float64 `json:"restart_ready_seconds"`
		Map     float64 `json:"map_seconds"`
		Dry     float64 `json:"dry_run_seconds"`
		Store   int64   `json:"store_bytes"`
		Goals   []struct {
			Met bool `json:"met"`
		} `json:"goals"`
	}
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	if rep.Devices != 1000 || rep.Ratio <= 0 || rep.Last.P50 <= 0 || rep.Last.CPU <= 0 || rep.Restart <= 0 || rep.Map <= 0 || rep.Dry <= 0 || rep.Store <= 0 || len(rep.Goals) != 6 {
		t.Fatalf("report: %s", out)
	}
	code, out, errOut = e.run("bench", "registry", "--devices", "1000", "--sample", "20")
	if code != 0 {
		t.Fatalf("exit %d\n%s\n%s", code, out, errOut)
	}
	for _, want := range []string{"one add at N", "restart until ready", "goals", "dry run of an add"} {
		if !strings.Contains(out, want) {
			t.Fatalf("the table lacks %q:\n%s", want, out)
		}
	}
	if code, _, errOut := e.run("bench", "registry", "--devices", "10"); code != 2 || !strings.Contains(errOut, "--devices 10") {
		t.Fatalf("too few devices: exit %d: %s", code, errOut)
	}
}

// TestBenchWatchersCommand: `enclave bench watchers`, small, over each
// transport: every watcher hears the rotation; memory and CPU per watcher
// reported; the watch transport holds two goroutines per watcher on the
// key server, gRPC four.
func TestBenchWatchersCommand(t *testing.T) {
	e := newEnv(t)
	const w = 200
	for _, tr := range []struct {
		name           string
		minGor, maxGor float64 // the key server's goroutines, per watcher
	}{{"watch", 2, 2.5}, {"grpc", 4, 5}} {
		code, out, errOut := e.run("bench", "watchers", "--watchers", fmt.Sprint(w), "--transport", tr.name, "--json")
		if code != 0 {
			t.Fatalf("%s: exit %d\n%s\n%s", tr.name, code, out, errOut)
		}
		var rep struct {
			Watchers   int     `json:"watchers"`
			Transport  string  `json:"transport"`
			Heard      int     `json:"rotation_heard"`
			All        float64 `json:"rotation_all_ms"`
			Heap       float64 `json:"server_heap_bytes_per_watcher"`
			CPU        float64 `json:"server_cpu_ms_per_watcher_opened"`
			Goroutines float64 `json:"server_goroutines"`
			Goals      []any   `json:"goals"`
		}
		if err := json.Unmarshal([]byte(out), &rep); err != nil {
			t.Fatalf("%v\n%s", err, out)
		}
		if rep.Watchers != w || rep.Transport != tr.name || rep.Heard != w || rep.All <= 0 || rep.All >= 30_000 || rep.Heap <= 0 || rep.CPU <= 0 || len(rep.Goals) != 2 {
			t.Fatalf("%s: report: %s", tr.name, out)
		}
		if per := rep.Goroutines / w; per < tr.minGor || per > tr.maxGor {
			t.Errorf("%s: the key server holds %.0f goroutines for %d watchers (%.2f each, want %v to %v)", tr.name, rep.Goroutines, w, per, tr.minGor, tr.maxGor)
		}
	}
	if code, _, errOut := e.run("bench", "watchers", "--transport", "h3"); code != 2 || !strings.Contains(errOut, "--transport") {
		t.Fatalf("an unknown transport: exit %d: %s", code, errOut)
	}
}
