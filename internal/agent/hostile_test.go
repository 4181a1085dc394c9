package agent

import (
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/enclavekeys/enclave/internal/control"
	"github.com/enclavekeys/enclave/internal/handshake"
	"github.com/enclavekeys/enclave/internal/packet"
)

// relay forwards a client's data and control datagrams to a server and
// back, recording what the client sent: an on-path attacker's vantage.
type relay struct {
	data, ctrl *net.UDPConn
	server     netip.AddrPort // the server's data port
	mu         sync.Mutex
	client     [2]netip.AddrPort // the client's data and control addresses
	dataSeen   [][]byte
	ctrlSeen   [][]byte
	// tag, when set, rewrites control datagrams from the client on their
	// way (a gateway appending its path entry).
	tag func([]byte) []byte
}

func newRelay(t *testing.T, server netip.AddrPort) *relay {
	t.Helper()
	for try := 0; try < 50; try++ {
		d, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			t.Fatal(err)
		}
		p := d.LocalAddr().(*net.UDPAddr).Port
		c, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: p + 1})
		if err != nil {
			d.Close()
			continue
		}
		r := &relay{data: d, ctrl: c, server: server}
		t.Cleanup(func() { d.Close(); c.Close() })
		go r.pump(r.data, 0, server)
		go r.pump(r.ctrl, 1, controlEndpoint(server))
		return r
	}
	t.Fatal("no free port pair")
	return nil
}

func (r *relay) endpoint() netip.AddrPort { return r.data.LocalAddr().(*net.UDPAddr).AddrPort() }

func (r *relay) pump(conn *net.UDPConn, kind int, server netip.AddrPort) {
	buf := make([]byte, 65535)
	for {
		n, src, err := conn.ReadFromUDPAddrPort(buf)
		if err != nil {
			return
		}
		msg := append([]byte(nil), buf[:n]...)
		r.mu.Lock()
		to := server
		if src == server {
			to = r.client[kind]
		} else {
			r.client[kind] = src
			if kind == 0 {
				r.dataSeen = append(r.dataSeen, msg)
			} else {
				r.ctrlSeen = append(r.ctrlSeen, msg)
				if r.tag != nil {
					msg = r.tag(msg)
				}
			}
		}
		r.mu.Unlock()
		if to.IsValid() {
			conn.WriteToUDPAddrPort(msg, to)
		}
	}
}

// setTag sets tag (its pumps read it under r.mu; tag runs under it).
func (r *relay) setTag(f func([]byte) []byte) {
	r.mu.Lock()
	r.tag = f
	r.mu.Unlock()
}

// inject sends msg to the server as if from the relay.
func (r *relay) inject(kind int, msg []byte) {
	if kind == 0 {
		r.data.WriteToUDPAddrPort(msg, r.server)
	} else {
		r.ctrl.WriteToUDPAddrPort(msg, controlEndpoint(r.server))
	}
}

// TestHostilePackets: replayed and tampered data packets, a replayed
// initiation, a tampered sealed message and an inner packet with a forged
// source are dropped and counted; the SA keeps working.
func TestHostilePackets(t *testing.T) {
	o := pairOrg(t)
	server := o.agentFor(serverID("web1", 3, 258, "100.64.3.1/16"), nil, nil)
	echoServer(t, server, 7)
	r := newRelay(t, server.DataPort())
	client := o.agentFor(clientID("laptop", 7, "100.64.7.1/16"), []Route{{Prefix: netip.PrefixFrom(server.Addr(), 32), Endpoint: r.endpoint()}}, nil)
	roundTrip(t, client, netip.AddrPortFrom(server.Addr(), 7), 2000)
	r.mu.Lock()
	data, ctrl := append([][]byte(nil), r.dataSeen...), append([][]byte(nil), r.ctrlSeen...)
	r.mu.Unlock()
	if len(data) == 0 || len(ctrl) == 0 {
		t.Fatal("nothing recorded")
	}
	drops := func(cause string) float64 {
		return metric(t, server, "enclave_agent_drops_total", map[string]string{"cause": cause})
	}
	r.inject(0, data[0]) // replay
	tampered := append([]byte(nil), data[len(data)-1]...)
	tampered[len(tampered)-5] ^= 1
	r.inject(0, tampered)
	waitFor(t, 5*time.Second, func() bool { return drops("replay") >= 1 && drops("auth") >= 1 })

	r.inject(1, ctrl[0]) // the initiation again
	waitFor(t, 5*time.Second, func() bool {
		return metric(t, server, "enclave_agent_handshakes_total", map[string]string{"result": "refused", "reason": "replay"}) >= 1
	})

	// A sealed message with a changed byte, on the client's session.
	client.mu.RLock()
	var c *conn
	for _, x := range client.t.bySPI {
		c = x
	}
	client.mu.RUnlock()
	sealed, err := c.session.Seal(&control.Inner{Type: control.InnerClose, Close: 1})
	if err != nil {
		t.Fatal(err)
	}
	sealed[len(sealed)-1] ^= 1
	r.inject(1, sealed)
	waitFor(t, 5*time.Second, func() bool { return drops("control_auth") >= 1 })

	// An inner packet whose source is not the client's overlay address,
	// sealed correctly under the client's SA.
	inner := make([]byte, 28)
	inner[0], inner[3], inner[9] = 0x45, 28, 17
	copy(inner[12:16], []byte{100, 64, 7, 99})
	copy(inner[16:20], server.Addr().AsSlice())
	buf := make([]byte, packet.Overhead+len(inner))
	copy(buf[packet.HeaderLen:], inner)
	pkt, err := c.out.Seal(buf, packet.NextIPv4, buf[packet.HeaderLen:packet.HeaderLen+len(inner)])
	if err != nil {
		t.Fatal(err)
	}
	r.inject(0, pkt)
	waitFor(t, 5*time.Second, func() bool { return drops("spoofed_source") >= 1 })

	// The SA still carries traffic.
	roundTrip(t, client, netip.AddrPortFrom(server.Addr(), 7), 2000)
}

// TestHandshakeFlood: initiations from many sources put the server under
// load; it answers them with cookies (no Diffie-Hellman), while a real
// client, echoing its cookie, still gets its SA.
func TestHandshakeFlood(t *testing.T) {
	o := pairOrg(t)
	server := o.agentFor(serverID("web1", 3, 258, "100.64.3.1/16"), nil, func(c *Config) {
		c.Guard = handshake.GuardConfig{LoadThreshold: 20, PerSource: 1000, Burst: 1000}
	})
	echoServer(t, server, 7)
	// A valid initiation to flood with, from a device of the org.
	lab := o.agentFor(clientID("lab", 9, "100.64.9.1/16"), nil, nil)
	_, flood, err := handshake.Initiate(lab.cfg.Credentials, 99, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for i := 2; i < 40; i++ {
		src, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, byte(i))})
		if err != nil {
			t.Skipf("cannot bind 127.0.0.%d: %v", i, err)
		}
		defer src.Close()
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				src.WriteToUDPAddrPort(flood, controlEndpoint(server.DataPort()))
				time.Sleep(5 * time.Millisecond)
			}
		}()
	}
	waitFor(t, 5*time.Second, func() bool {
		return metric(t, server, "enclave_agent_handshakes_total", map[string]string{"result": "cookie"}) > 50
	})
	client := o.agentFor(clientID("laptop", 7, "100.64.7.1/16"), []Route{route(server)}, nil)
	roundTrip(t, client, netip.AddrPortFrom(server.Addr(), 7), 1000)
	close(stop)
	wg.Wait()
	if metric(t, client, "enclave_agent_handshakes_total", map[string]string{"side": "initiator", "result": "cookie"}) == 0 {
		t.Fatal("the client connected without being asked for a cookie: the server was not under load")
	}
}

// TestForgedResponseIgnored: an on-path attacker answers every initiation
// first with a forged Response (garbage where the Noise message goes, and
// a short one). The client drops and counts them and completes the
// handshake with the server's real Response (before, the first forged
// Response ended the handshake).
func TestForgedResponseIgnored(t *testing.T) {
	o := pairOrg(t)
	server := o.agentFor(serverID("web1", 3, 258, "100.64.3.1/16"), nil, nil)
	echoServer(t, server, 7)
	r := newRelay(t, server.DataPort())
	r.setTag(func(msg []byte) []byte {
		in, err := control.ParseInitiation(msg)
		if err != nil {
			return msg
		}
		for _, n := range []int{200, 40} {
			forged, err := control.AppendResponse(nil, 0x0badf00d, in.Sender, make([]byte, n))
			if err != nil {
				t.Error(err)
				return msg
			}
			r.ctrl.WriteToUDPAddrPort(forged, r.client[1])
		}
		time.Sleep(20 * time.Millisecond) // the forged ones arrive first
		return msg
	})
	client := o.agentFor(clientID("laptop", 7, "100.64.7.1/16"), []Route{{Prefix: netip.PrefixFrom(server.Addr(), 32), Endpoint: r.endpoint()}}, nil)
	roundTrip(t, client, netip.AddrPortFrom(server.Addr(), 7), 2000)
	if n := metric(t, client, "enclave_agent_drops_total", map[string]string{"cause": "control_response_unauthenticated"}); n < 1 {
		t.Fatalf("%v forged Responses counted", n)
	}
	if n := metric(t, client, "enclave_agent_handshakes_total", map[string]string{"side": "initiator", "result": "ok"}); n < 1 {
		t.Fatal("no handshake completed")
	}
}

// TestInnerDestinationChecked: an authenticated inner packet whose
// destination is not the receiving agent's overlay address (127.0.0.1, a
// broadcast, another device's address) is dropped and counted, never
// handed to its stack; the SA keeps working.
func TestInnerDestinationChecked(t *testing.T) {
	server, client := echoPair(t)
	roundTrip(t, client, netip.AddrPortFrom(server.Addr(), 7), 100)
	client.mu.RLock()
	c := client.t.route[server.Addr()]
	client.mu.RUnlock()
	for _, dst := range []string{"127.0.0.1", "255.255.255.255", "100.64.3.2", "10.0.0.1"} {
		inner := ipv4Packet(client.Addr(), netip.MustParseAddr(dst), 40)
		buf := make([]byte, packet.Overhead+len(inner))
		pkt, err := c.out.Seal(buf, packet.NextIPv4, inner)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := client.data.WriteToUDPAddrPort(pkt, server.DataPort()); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, 5*time.Second, func() bool {
		return metric(t, server, "enclave_agent_drops_total", map[string]string{"cause": "wrong_destination"}) >= 4
	})
	roundTrip(t, client, netip.AddrPortFrom(server.Addr(), 7), 100)
}
