package gateway

import (
	"testing"
	"time"
)

// TestStartsBeforeKeyService: a gateway started while the key service is
// down waits for it instead of failing, and reads its granted pair as soon
// as the service answers.
func TestStartsBeforeKeyService(t *testing.T) {
	l := newLab(t)
	l.grant("gw1", [2]uint32{1, 2})
	l.o.Down()
	start := time.Now()
	go func() {
		time.Sleep(1500 * time.Millisecond)
		l.o.Up()
	}()
	gw := l.gateway("gw1", 1, gwOpts{})
	if waited := time.Since(start); waited < time.Second {
		t.Fatalf("ready after %v, before the key service was up", waited)
	}
	cli := l.client("cli", 1, "100.64.1.1/16", gw.RelayAddr())
	mustExchange(t, cli, "100.64.2.1:7", 2000)
	if n := counter(t, gw.Metrics().Registry(), "enclave_gateway_pair_packets_total", map[string]string{"pair": "1-2", "outcome": "read"}); n == 0 {
		t.Fatal("the gateway read nothing of its granted pair")
	}
}
