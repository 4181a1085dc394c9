package keyserver

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/enclavekeys/enclave/internal/api"
	"github.com/enclavekeys/enclave/internal/audit"
	"github.com/enclavekeys/enclave/internal/ca"
)

// TestWatchOpensSummarised: watch streams opened are audited in summaries
// naming every device that opened one, not in an entry (and a disk sync)
// each; the log still verifies.
func TestWatchOpensSummarised(t *testing.T) {
	eachTransport(t, func(t *testing.T, lean bool) { testWatchOpensSummarised(t, lean) })
}

func testWatchOpensSummarised(t *testing.T, lean bool) {
	l := newLab(t)
	l.lean = lean
	setup(t, l)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ids := []ca.Identity{idServer, idServer, {Name: "gw", Role: ca.RoleGateway}}
	for _, id := range ids {
		stream, err := l.client(id).WatchGenerations(ctx, &api.WatchGenerationsRequest{})
		if err == nil {
			_, err = stream.Recv()
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	var opened []string
	waitFor(t, func() bool {
		opened = opened[:0]
		for _, line := range strings.Split(readFile(t, l.audit), "\n") {
			var e audit.Entry
			if json.Unmarshal([]byte(line), &e) != nil || e.RPC != "WatchGenerations" {
				continue
			}
			if e.Caller != "keyserver" || e.Decision != audit.Allow {
				t.Fatalf("a watch open audited on its own: %s", line)
			}
			opened = append(opened, e.Opened...)
		}
		return len(opened) == len(ids)
	})
	for i, id := range ids {
		if !strings.Contains(opened[i], "/"+id.Name+" from 127.0.0.1 at ") {
			t.Errorf("opened[%d] = %q, want %s, where from and when", i, opened[i], id.Name)
		}
	}
	time.Sleep(opensInterval + 200*time.Millisecond) // nothing more to write
	l.verifyAudit()
}

// TestWatchOpensLongNames: many long names are split into summaries that
// each fit a line; none is lost.
func TestWatchOpensLongNames(t *testing.T) {
	l := newLab(t)
	var want []string
	for i := range 300 {
		want = append(want, fmt.Sprintf("spiffe://%s/server/%s-%03d from 2001:db8::1 at 12:00:00.000", strings.Repeat("o", 52), strings.Repeat("d", 60), i))
	}
	l.svc.opens.mu.Lock()
	l.svc.opens.opened = append(l.svc.opens.opened, want...)
	l.svc.opens.mu.Unlock()
	l.svc.flushWatchOpens(false)
	var got []string
	for _, line := range strings.Split(readFile(t, l.audit), "\n") {
		var e audit.Entry
		if json.Unmarshal([]byte(line), &e) == nil && e.RPC == "WatchGenerations" {
			if len(line) > audit.MaxLine {
				t.Fatalf("a summary of %d bytes", len(line))
			}
			got = append(got, e.Opened...)
		}
	}
	if len(got) != len(want) {
		t.Fatalf("%d names written, want %d", len(got), len(want))
	}
	l.verifyAudit()
}
