package agent

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/handshake"
	"github.com/enclavekeys/enclave/internal/keys"
)

// timerAgent is an agent that is not running, on a clock the test moves,
// whose SAs the test installs by hand; the timers are driven by calling
// tick.
func timerAgent(t testing.TB, now *time.Time, idle time.Duration) *Agent {
	o := newOrg(t, time.Hour)
	srv := serverID("srv", 3, 7, "100.64.0.1/10")
	a, err := New(Config{Credentials: o.Credentials(srv), KeyService: o.KeyService(srv), Listen: netip.MustParseAddrPort("127.0.0.1:0"),
		IdleTimeout: idle, Lifetime: time.Hour, RekeyBefore: 5 * time.Second, Now: func() time.Time { return *now }})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close() })
	return a
}

// fakeSA is SA number i with a peer, installed at now.
func fakeSA(i int, peer int, server bool, expires time.Time, sink netip.AddrPort) *conn {
	v := uint32(100)<<24 | uint32(64)<<16 + uint32(peer) + 2
	c := &conn{peer: ca.Identity{Name: fmt.Sprint("peer", peer)}, server: server,
		overlay: netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)}),
		recvSPI: keys.SPI(i + 1), session: &handshake.Session{Local: uint32(i + 1)}, expires: expires}
	c.setEndpoint(sink)
	return c
}

// TestTickMatchesScan runs random SAs (server SAs that idle, share peers
// and replace each other; client SAs that rekey) through random ticks and
// checks after each that the timers did exactly what a walk over every SA
// would: the SAs past their end or idle limit removed, the client SAs in
// their rekey window that are the route rekeyed, nothing else.
func TestTickMatchesScan(t *testing.T) {
	sink, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)}) // swallows the rekeys' initiations
	if err != nil {
		t.Fatal(err)
	}
	defer sink.Close()
	sinkAddr := sink.LocalAddr().(*net.UDPAddr).AddrPort()
	for seed := range uint64(20) {
		t.Run(fmt.Sprint("seed", seed), func(t *testing.T) {
			rng := rand.New(rand.NewPCG(seed, 1))
			now := time.Unix(1_800_000_000, 123_456_789)
			idle := 3 * time.Second
			if seed%2 == 1 { // no idle timeout: server SAs live until their end, or a replacement's drain
				idle = 0
			}
			a := timerAgent(t, &now, idle)
			var all []*conn // every SA ever installed
			next := 0
			removed, rekeyed := 0, 0
			for step := range 400 {
				a.mu.Lock()
				switch op := rng.IntN(10); {
				case op < 4: // a server SA, often with a peer that has one
					c := fakeSA(next, rng.IntN(30), true, now.Add(time.Duration(rng.IntN(60_000))*time.Millisecond+time.Duration(rng.IntN(1000))), sinkAddr)
					c.lastSeen.Store(now.UnixMilli() - int64(rng.IntN(2000)))
					a.t.add(c, now)
					all, next = append(all, c), next+1
				case op < 5: // a client SA, one per peer
					c := fakeSA(next, 1000+next, false, now.Add(time.Duration(rng.IntN(20_000))*time.Millisecond), sinkAddr)
					a.t.add(c, now)
					all, next = append(all, c), next+1
				case op < 7: // traffic on a server SA
					if len(all) > 0 {
						if c := all[rng.IntN(len(all))]; c.server {
							c.lastSeen.Store(now.UnixMilli())
						}
					}
				case op < 8: // a client's first packet on a replacing SA
					if len(all) > 0 {
						if c := all[rng.IntN(len(all))]; !c.closed.Load() {
							a.t.promote(c, now)
						}
					}
				case op < 9: // closed by its peer
					if len(all) > 0 {
						if c := all[rng.IntN(len(all))]; !c.closed.Load() {
							a.t.remove(c)
						}
					}
				}
				a.mu.Unlock()
				now = now.Add(time.Duration(rng.IntN(1500)) * time.Millisecond)

				// What a walk over every SA says this tick must do.
				var wantGone, wantRekey []int
				a.mu.Lock()
				for i, c := range all {
					switch {
					case c.closed.Load():
					case !now.Before(c.expires):
						wantGone = append(wantGone, i)
					case c.server && idle > 0 && c.lastSeen.Load() < now.UnixMilli()-idle.Milliseconds():
						wantGone = append(wantGone, i)
					case !c.server && !now.Before(c.expires.Add(-5*time.Second)) && a.t.route[c.overlay] == c && !c.rekeying.Load():
						wantRekey = append(wantRekey, i)
					}
				}
				wasRekeying, wasClosed := make([]bool, len(all)), make([]bool, len(all))
				for i, c := range all {
					wasRekeying[i], wasClosed[i] = c.rekeying.Load(), c.closed.Load()
				}
				a.mu.Unlock()

				a.tick(now)

				var gone, rekey []int
				a.mu.Lock()
				for i, c := range all {
					if _, in := a.t.bySPI[c.recvSPI]; !in && !c.closed.Load() {
						t.Fatalf("step %d: SA %d out of the table but not closed", step, i)
					}
					if c.closed.Load() && c.slot != 0 {
						t.Fatalf("step %d: closed SA %d still in the deadlines", step, i)
					}
					if !c.closed.Load() && c.slot == 0 {
						t.Fatalf("step %d: SA %d has no deadline", step, i)
					}
					if c.closed.Load() && !wasClosed[i] {
						gone = append(gone, i)
					}
					if c.rekeying.Load() && !wasRekeying[i] {
						rekey = append(rekey, i)
					}
				}
				a.mu.Unlock()
				if !slices.Equal(gone, wantGone) {
					t.Fatalf("step %d at %v: removed %v, a walk removes %v", step, now, gone, wantGone)
				}
				if !slices.Equal(rekey, wantRekey) {
					for _, i := range wantRekey {
						c := all[i]
						t.Logf("SA %d: expires %v due %d slot %d rekeying %v dial %v", i, c.expires, c.due, c.slot, c.rekeying.Load(), a.dials[c.overlay] != nil)
					}
					t.Fatalf("step %d at %v: rekeyed %v, a walk rekeys %v", step, now, rekey, wantRekey)
				}
				removed += len(gone)
				rekeyed += len(rekey)
				for _, i := range rekey { // the rekey's handshake fails; the SA may try again
					a.mu.Lock()
					delete(a.dials, all[i].overlay)
					a.mu.Unlock()
					all[i].rekeying.Store(false)
				}
			}
			if removed == 0 || rekeyed == 0 {
				t.Fatalf("the run removed %d SAs and rekeyed %d: it tests nothing", removed, rekeyed)
			}
		})
	}
}

// BenchmarkTick is one tick of the timers with 100,000 server SAs, none of
// them due (a walk over every SA took 17 ms under the agent's lock).
func BenchmarkTick(b *testing.B) {
	now := time.Now()
	a := timerAgent(b, &now, time.Hour)
	for i := range 100000 {
		c := fakeSA(i, i, true, now.Add(time.Hour), netip.AddrPort{})
		c.lastSeen.Store(now.UnixMilli())
		a.t.add(c, now)
	}
	b.ResetTimer()
	for range b.N {
		a.tick(now)
	}
}

// syncBuffer is a bytes.Buffer safe for the agent's goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// TestUnansweredHandshakeLogged: a peer that never answers is named in a
// warning, with its control address, once the handshake gives up (it was
// silent before).
func TestUnansweredHandshakeLogged(t *testing.T) {
	o := newOrg(t, 2*time.Second)
	var logs syncBuffer
	silent, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	ep := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(silent.LocalAddr().(*net.UDPAddr).Port-1))
	c := o.agentFor(clientID("laptop", 7, "100.64.7.1/16"), []Route{{Prefix: netip.MustParsePrefix("100.64.3.0/24"), Endpoint: ep}},
		func(c *Config) { c.Logger = slog.New(slog.NewJSONHandler(&logs, nil)) })
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	c.Net().DialContextTCPAddrPort(ctx, netip.MustParseAddrPort("100.64.3.1:7"))
	cancel()
	want := fmt.Sprintf(`"control":"%s"`, silent.LocalAddr())
	waitFor(t, 15*time.Second, func() bool {
		return strings.Contains(logs.String(), "no answer to the handshake") && strings.Contains(logs.String(), want)
	})
}
