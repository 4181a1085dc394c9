package agent

import (
	"bytes"
	"context"
	"io"
	"net/netip"
	"testing"
	"time"

	"github.com/enclavekeys/enclave/internal/api"
)

// pairOrg registers enclaves 3 and 7, a server web1 in 3 and a client
// laptop in 7, with pair 3-7 allowed.
func pairOrg(t *testing.T) *org {
	o := newOrg(t, 2*time.Second)
	o.register([]uint32{3, 7, 9},
		[]*api.AddDeviceRequest{
			{Name: "web1", Role: "server", Enclave: 3, ServerId: u32(258)},
			{Name: "laptop", Role: "client", Enclave: 7},
			{Name: "lab", Role: "client", Enclave: 9},
		},
		[][2]uint32{{3, 7}})
	return o
}

// echoServer accepts TCP connections on the agent's stack at port and
// echoes what it reads.
func echoServer(t *testing.T, a *Agent, port uint16) {
	t.Helper()
	ln, err := a.Net().ListenTCPAddrPort(netip.AddrPortFrom(a.Addr(), port))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { io.Copy(c, c); c.Close() }()
		}
	}()
}

// roundTrip dials the echo server through the client's stack and checks
// n bytes come back.
func roundTrip(t *testing.T, client *Agent, to netip.AddrPort, n int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := client.Net().DialContextTCPAddrPort(ctx, to)
	if err != nil {
		t.Fatalf("dial %s: %v", to, err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	msg := bytes.Repeat([]byte("enclave!"), n/8+1)[:n]
	go c.Write(msg)
	got := make([]byte, n)
	if _, err := io.ReadFull(c, got); err != nil {
		t.Fatalf("read: %v", err)
	}
	if !bytes.Equal(got, msg) {
		t.Fatal("echo differs")
	}
}

func TestTwoAgentsTCP(t *testing.T) {
	o := pairOrg(t)
	server := o.agentFor(serverID("web1", 3, 258, "100.64.3.1/16"), nil, nil)
	echoServer(t, server, 7)
	client := o.agentFor(clientID("laptop", 7, "100.64.7.1/16"), []Route{route(server)}, nil)
	roundTrip(t, client, netip.AddrPortFrom(server.Addr(), 7), 100_000)
	if client.SAs() != 1 || server.SAs() != 1 {
		t.Fatalf("SAs: client %d, server %d", client.SAs(), server.SAs())
	}
}

