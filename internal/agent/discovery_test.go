package agent

import (
	"context"
	"crypto/ed25519"
	"net/netip"
	"testing"
	"time"

	"github.com/enclavekeys/enclave/internal/api"
	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/control"
)

// nomad is a client whose certificate names no enclave.
func nomad() ca.Identity {
	return ca.Identity{Name: "nomad", Role: ca.RoleClient, Overlay: netip.MustParsePrefix("100.64.7.50/16")}
}

func discoveryOrg(t *testing.T) *org {
	o := newOrg(t, 2*time.Second)
	o.Register([]uint32{3, 7},
		[]*api.AddDeviceRequest{
			{Name: "web1", Role: "server", Enclave: 3, ServerId: u32(258)},
			{Name: "nomad", Role: "client"},
			{Name: "gw7", Role: "gateway", Enclave: 7},
		},
		[][2]uint32{{3, 7}})
	return o
}

// TestSelfReport: a client whose certificate names no enclave is served
// on its own word only where the server trusts unsigned reports.
func TestSelfReport(t *testing.T) {
	o := discoveryOrg(t)
	strict := o.agentFor(serverID("web1", 3, 258, "100.64.3.1/16"), nil, nil)
	echoServer(t, strict, 7)
	c := o.agentFor(nomad(), []Route{route(strict)}, func(c *Config) { c.SelfReport = 7 })
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	if conn, err := c.Net().DialContextTCPAddrPort(ctx, netip.AddrPortFrom(strict.Addr(), 7)); err == nil {
		conn.Close()
		t.Fatal("a self-report was trusted by a strict server")
	}
	cancel()
	waitFor(t, 5*time.Second, func() bool {
		return metric(t, strict, "enclave_agent_handshakes_total", map[string]string{"result": "refused", "reason": "enclave"}) > 0
	})
	strict.Close()

	lenient := o.agentFor(serverID("web1", 3, 258, "100.64.3.1/16"), nil, func(c *Config) { c.TrustUnsigned = true })
	echoServer(t, lenient, 7)
	c2 := o.agentFor(nomad(), []Route{route(lenient)}, func(c *Config) { c.SelfReport = 7 })
	roundTrip(t, c2, netip.AddrPortFrom(lenient.Addr(), 7), 500)
}

// TestGatewayChain: a gateway on the path appends its signed entry (here
// the on-path relay does it with the gateway's certificate), and the
// server places the client in the gateway's enclave.
func TestGatewayChain(t *testing.T) {
	o := discoveryOrg(t)
	server := o.agentFor(serverID("web1", 3, 258, "100.64.3.1/16"), nil, nil)
	echoServer(t, server, 7)
	gwCert, _, gwKeyPEM := o.Issue(ca.Identity{Name: "gw7", Role: ca.RoleGateway, Enclave: 7})
	gwKey, err := ca.ParseKeyPEM(gwKeyPEM)
	if err != nil {
		t.Fatal(err)
	}
	r := newRelay(t, server.DataPort())
	r.mu.Lock()
	r.tag = func(msg []byte) []byte {
		h, err := control.ParseHeader(msg)
		if err != nil || h.Type != control.TypeInitiation {
			return msg
		}
		in, err := control.ParseInitiation(msg)
		if err != nil {
			return msg
		}
		to := netip.AddrPortFrom(server.DataPort().Addr(), server.DataPort().Port()+1)
		e := control.PathEntry{Flags: control.PathSigned, Enclave: 7, To: to, Cert: gwCert.Raw}
		m, _ := control.PathSignedBytes(in.Noise, in.Path.PriorBytes(len(in.Path.Entries)), &e)
		copy(e.Signature[:], ed25519.Sign(gwKey, m))
		at, _ := control.PathOffset(msg)
		out, err := control.AppendEntry(msg, at, &e)
		if err != nil {
			return msg
		}
		return out
	}
	r.mu.Unlock()
	c := o.agentFor(nomad(), []Route{{Prefix: netip.PrefixFrom(server.Addr(), 32), Endpoint: r.endpoint()}}, nil)
	roundTrip(t, c, netip.AddrPortFrom(server.Addr(), 7), 500)
	server.mu.RLock()
	defer server.mu.RUnlock()
	for _, x := range server.t.bySPI {
		if x.vc.Peer != 7 {
			t.Fatalf("the server placed the client in enclave %d", x.vc.Peer)
		}
	}
}
