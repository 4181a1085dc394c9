package agent

import (
	"context"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/enclavekeys/enclave/internal/api"
	"github.com/enclavekeys/enclave/internal/control"
)

// lossyPath stands between one client and one server on loopback: a data
// and a control port side by side, as an agent's, forwarding each way.
// While dropping is set it loses every handshake datagram (initiations,
// responses, cookie replies) and passes the rest (data, a session's
// sealed notices, UnknownSA): a path whose MTU or middlebox breaks
// handshakes while running SAs go on.
type lossyPath struct {
	data     netip.AddrPort // the client's route endpoint
	dropping atomic.Bool
	dropped  atomic.Int64
}

func newLossyPath(t *testing.T, server netip.AddrPort) *lossyPath {
	t.Helper()
	var socks [2]*net.UDPConn
	for try := 0; ; try++ {
		d, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			t.Fatal(err)
		}
		port := d.LocalAddr().(*net.UDPAddr).Port
		c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: port + 1})
		if err == nil {
			socks = [2]*net.UDPConn{d, c}
			break
		}
		d.Close()
		if try > 50 {
			t.Fatal(err)
		}
	}
	p := &lossyPath{data: socks[0].LocalAddr().(*net.UDPAddr).AddrPort()}
	var wg sync.WaitGroup
	t.Cleanup(func() {
		for _, s := range socks {
			s.Close()
		}
		wg.Wait()
	})
	for i, s := range socks {
		far := netip.AddrPortFrom(server.Addr(), server.Port()+uint16(i))
		wg.Add(1)
		go func() {
			defer wg.Done()
			var client netip.AddrPort
			buf := make([]byte, 65535)
			for {
				n, from, err := s.ReadFromUDPAddrPort(buf)
				if err != nil {
					return
				}
				to := far
				if from == far {
					to = client
				} else {
					client = from
				}
				if i == 1 && p.dropping.Load() && n > 2 && buf[2] >= byte(control.TypeInitiation) && buf[2] <= byte(control.TypeCookieReply) {
					p.dropped.Add(1)
					continue
				}
				if to.IsValid() {
					s.WriteToUDPAddrPort(buf[:n], to)
				}
			}
		}()
	}
	return p
}

// convergeRig is one client sending a datagram every 20 ms to a server's
// echo through a lossyPath, with what the tests read of it.
type convergeRig struct {
	t      *testing.T
	o      *org
	client *Agent
	path   *lossyPath
	logs   *lockedLog
	last   atomic.Int64 // when the last echo came (Unix ns)
	gap    atomic.Int64 // the longest time between echoes (ns) since reset
}

func newConvergeRig(t *testing.T) *convergeRig {
	r := &convergeRig{t: t, o: pairOrg(t), logs: &lockedLog{}}
	server := r.o.agentFor(serverID("web1", 3, 258, "100.64.3.1/16"), nil, nil)
	udpEcho(t, server, 9000)
	r.path = newLossyPath(t, server.DataPort())
	r.client = r.o.agentFor(clientID("laptop", 7, "100.64.7.1/16"),
		[]Route{{Prefix: netip.PrefixFrom(server.Addr(), 32), Endpoint: r.path.data}},
		func(c *Config) { c.Logger = slog.New(slog.NewTextHandler(r.logs, nil)) })
	c, err := r.client.Net().DialUDPAddrPort(netip.AddrPort{}, netip.AddrPortFrom(server.Addr(), 9000))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	go func() {
		buf := make([]byte, 100)
		for {
			if _, err := c.Read(buf); err != nil {
				return
			}
			now := time.Now().UnixNano()
			if prev := r.last.Swap(now); prev != 0 && now-prev > r.gap.Load() {
				r.gap.Store(now - prev)
			}
		}
	}()
	pinging(t, c)
	waitFor(t, 10*time.Second, func() bool { return r.last.Load() != 0 })
	return r
}

// generation is the generation of the SA the client sends on (0: none).
func (r *convergeRig) generation() int {
	for _, p := range r.client.Status().Peers {
		for _, s := range p.SAs {
			if s.Route {
				return int(s.Generation)
			}
		}
	}
	return 0
}

// rotate rotates pair 3-7 at once (--now: the generation before the
// previous one is retired).
func (r *convergeRig) rotate() {
	r.t.Helper()
	res, err := r.o.Admin.Rotate(context.Background(), &api.RotateRequest{Pair: &api.Pair{A: 3, B: 7}, Now: true})
	if err != nil || res.Rotations[0].Outcome != "rotated" {
		r.t.Fatalf("rotate: %+v %v", res, err)
	}
}

// TestRekeyConverges (issue 32, blocker 2): the path loses every
// handshake while the pair is rotated; the server's notice reaches the
// client, whose rekey fails. Once the path heals, the client moves to the
// new generation on its own (within a few seconds, no restart, no new
// notice), so that the next rotation (--now: the old generation is
// retired at once) costs no traffic. On the code before, the client
// stayed on the old generation until its SA's lifetime, and the second
// rotation cut it off until an UnknownSA made it start again.
func TestRekeyConverges(t *testing.T) {
	r := newConvergeRig(t)
	first := r.generation()
	r.path.dropping.Store(true)
	r.rotate()
	// The notice arrives; every handshake of the rekey is lost, until the
	// client's tries run out.
	waitFor(t, 10*time.Second, func() bool { return r.path.dropped.Load() > 0 })
	time.Sleep(handshakeTimeout * (handshakeTries + 1))
	if g := r.generation(); g != first {
		t.Fatalf("the client moved to generation %d through a path that loses handshakes", g)
	}
	r.path.dropping.Store(false)
	healed := time.Now()
	waitFor(t, 10*time.Second, func() bool { return r.generation() > first })
	t.Logf("on the new generation %v after the path healed", time.Since(healed).Round(time.Millisecond))

	// The next rotation retires the generation the client left: no echo
	// is missed for long.
	r.gap.Store(0)
	r.rotate()
	time.Sleep(3 * time.Second)
	if g := time.Duration(r.gap.Load()); g > slowdown*time.Second {
		t.Errorf("echoes stopped for %v across the second rotation\n%s", g, r.logs.String())
	}
}

// TestRekeyConvergesAfterRetirement (issue 32's test): the path loses
// every handshake during two rotations (--now), so the server retires the
// generation the client still sends on; once the path heals, the echoes
// come back within 2 s, with no restart.
func TestRekeyConvergesAfterRetirement(t *testing.T) {
	r := newConvergeRig(t)
	first := r.generation()
	r.path.dropping.Store(true)
	r.rotate()
	time.Sleep(2 * time.Second)
	r.rotate()
	time.Sleep(2 * time.Second)
	if since := time.Since(time.Unix(0, r.last.Load())); since < time.Second {
		t.Fatalf("echoes still came %v ago, though the server retired the client's generation", since)
	}
	// The server told the client (its session's sealed Close reaches it):
	// it sends on no SA of the retired generation.
	if g := r.generation(); g == first {
		t.Errorf("the client still sends on generation %d, which the server retired", g)
	}
	r.path.dropping.Store(false)
	healed := time.Now()
	waitFor(t, 10*time.Second, func() bool { return r.last.Load() > healed.UnixNano() })
	took := time.Unix(0, r.last.Load()).Sub(healed)
	t.Logf("echoes again %v after the path healed", took.Round(time.Millisecond))
	if took > slowdown*2*time.Second {
		t.Errorf("traffic came back %v after the path healed, want within 2 s\n%s", took, r.logs.String())
	}
}
