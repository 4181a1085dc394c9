package agent

import (
	"context"
	"net/netip"
	"testing"
	"time"
)

// TestDirectory: a server agent registers its endpoint with the key
// service; a client with a key service and no route to it (no --peer)
// looks it up, checks the entry and reaches it; a client of an enclave
// the pair policy keeps apart finds nothing and its packets are dropped
// as unroutable.
func TestDirectory(t *testing.T) {
	o := pairOrg(t)
	server := o.agentFor(serverID("web1", 3, 258, "100.64.3.1/16"), nil, nil)
	echoServer(t, server, 7)
	withKS := func(c *Config) { c.KeyService = o.KeyService(clientID("laptop", 7, "100.64.7.1/16")) }
	client := o.agentFor(clientID("laptop", 7, "100.64.7.1/16"), nil, withKS)
	roundTrip(t, client, netip.AddrPortFrom(server.Addr(), 7), 1000)
	client.mu.RLock()
	r, ok := client.resolved[server.Addr()]
	client.mu.RUnlock()
	if !ok || r.device != "web1" || r.route.Endpoint != server.DataPort() {
		t.Fatalf("the directory's answer: %+v %v", r, ok)
	}
	client.forgetEndpoint("web1") // what an ENDPOINT event on the watch does
	client.mu.RLock()
	_, ok = client.resolved[server.Addr()]
	client.mu.RUnlock()
	if ok {
		t.Fatal("an answer about a server whose entry changed was kept")
	}

	stranger := o.agentFor(clientID("lab", 9, "100.64.9.1/16"), nil, func(c *Config) { c.KeyService = o.KeyService(clientID("lab", 9, "100.64.9.1/16")) })
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if c, err := stranger.Net().DialContextTCPAddrPort(ctx, netip.AddrPortFrom(server.Addr(), 7)); err == nil {
		c.Close()
		t.Fatal("a client of a pair not allowed found the server in the directory")
	}
	waitFor(t, 5*time.Second, func() bool {
		return metric(t, stranger, "enclave_agent_drops_total", map[string]string{"cause": "no_route"}) > 0
	})
}
