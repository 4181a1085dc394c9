package agent

import (
	"context"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/orgtest"
)

// org is a real key service on loopback (orgtest) that starts agents.
type org struct{ *orgtest.Org }

func newOrg(t testing.TB, grace time.Duration) *org { return &org{orgtest.New(t, grace)} }

func itoa(v uint32) string {
	if v == 0 {
		return "0"
	}
	var b []byte
	for ; v > 0; v /= 10 {
		b = append([]byte{byte('0' + v%10)}, b...)
	}
	return string(b)
}

func u32(v uint32) *uint32 { return &v }

// agentFor starts an agent for id on loopback. A server (id.Role server)
// gets a key-service connection. It retries ports until the data port and
// the one after it are both free.
func (o *org) agentFor(id ca.Identity, routes []Route, tweak func(*Config)) *Agent {
	o.T.Helper()
	a, _ := o.startAgent(id, routes, tweak, netip.AddrPort{})
	return a
}

// startAgent starts an agent for id listening on listen (any free port
// pair when it is not valid) and returns it with a function that stops it
// (a restart is a stop and a new agent on the same address).
func (o *org) startAgent(id ca.Identity, routes []Route, tweak func(*Config), listen netip.AddrPort) (*Agent, func()) {
	o.T.Helper()
	cfg := Config{Credentials: o.Credentials(id), Routes: routes}
	if id.Role == ca.RoleServer {
		cfg.KeyService = o.KeyService(id)
	}
	if tweak != nil {
		tweak(&cfg)
	}
	var a *Agent
	var err error
	for try := 0; ; try++ {
		cfg.Listen = listen
		if !listen.IsValid() {
			cfg.Listen = netip.MustParseAddrPort("127.0.0.1:0")
		}
		if a, err = New(cfg); err == nil {
			break
		}
		if try > 50 {
			o.T.Fatal(err)
		}
		if listen.IsValid() {
			time.Sleep(20 * time.Millisecond)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	var once sync.Once
	stop := func() { once.Do(func() { cancel(); <-done }) }
	o.T.Cleanup(stop)
	select {
	case <-a.Ready():
	case err := <-done:
		o.T.Fatalf("agent did not start: %v", err)
	}
	return a, stop
}

func waitFor(t testing.TB, d time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met in time")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func route(a *Agent) Route {
	return Route{Prefix: netip.PrefixFrom(a.Addr(), a.Addr().BitLen()), Endpoint: a.DataPort()}
}

func serverID(name string, e keys.EnclaveID, k keys.ServerID, ip string) ca.Identity {
	return ca.Identity{Name: name, Role: ca.RoleServer, Enclave: e, ServerID: k, HasServerID: true, Overlay: netip.MustParsePrefix(ip)}
}

func clientID(name string, e keys.EnclaveID, ip string) ca.Identity {
	return ca.Identity{Name: name, Role: ca.RoleClient, Enclave: e, Overlay: netip.MustParsePrefix(ip)}
}
