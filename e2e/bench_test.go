package e2e

import (
	"encoding/json"
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
