package lab

import (
	"context"
	"crypto/rand"
	"crypto/x509"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/enclavekeys/enclave/internal/api"
	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/control"
	"github.com/enclavekeys/enclave/internal/handshake"
	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/registry"
	"github.com/enclavekeys/enclave/internal/sa"
)

// The SA scale bench (enclave bench sas): one server agent, a process of
// its own so that its memory and CPU are its own, serving N SAs made by
// an in-process load generator that runs the client side of real
// handshakes (Noise IX with a certificate per client, the server's flood
// guard and cookies, the grant) over UDP on loopback, with a real key
// service over mTLS. A sample of the SAs carries pings (ICMP echo to the
// server's stack) while the pair rotates and every SA is re-established.

// SASConfig sets up a bench run.
type SASConfig struct {
	Count   int           // SAs to bring up
	Clients int           // concurrent handshakes (workers)
	Sample  int           // SAs that carry pings (default 100)
	Spread  time.Duration // the server's rekey spread after the rotation (default and at most: half the grace)
	// Duration is how long the sample carries traffic before the
	// rotation (default 1 s).
	Duration time.Duration
	// Progress gets a line while it runs (rewritten in place on a
	// terminal).
	Progress io.Writer
	Terminal bool
	Log      *slog.Logger
}

// SASReport is what a bench run measured.
type SASReport struct {
	Count   int     `json:"count"`
	Clients int     `json:"clients"`
	Seconds float64 `json:"seconds"`
	// Handshakes per second over the whole build-up, over its first
	// 10% and over its last 10%, and the latency of a handshake.
	Rate      float64 `json:"handshakes_per_second"`
	RateFirst float64 `json:"handshakes_per_second_first_tenth"`
	RateLast  float64 `json:"handshakes_per_second_last_tenth"`
	P50ms     float64 `json:"handshake_p50_ms"`
	P99ms     float64 `json:"handshake_p99_ms"`
	Retries   int64   `json:"retries"`
	Cookies   int64   `json:"cookie_replies"`
	// The server agent: memory before and with N SAs, per SA, its CPU.
	RSSBefore, RSSAfter   float64 `json:"-"`
	HeapBefore, HeapAfter float64 `json:"-"`
	RSSPerSA              float64 `json:"server_rss_bytes_per_sa"`
	HeapPerSA             float64 `json:"server_heap_bytes_per_sa"`
	ServerRSS             float64 `json:"server_rss_bytes"`
	ServerSAs             float64 `json:"server_sas"`
	CPUPer1000            float64 `json:"server_cpu_seconds_per_1000_handshakes"`
	HierarchyKeys         float64 `json:"server_hierarchy_keys"`
	// ServerRequests is every request the server made of the key
	// service over the whole run, by RPC.
	ServerRequests map[string]float64 `json:"server_key_service_requests"`
	// The rotation: key-service requests it cost the server, how long
	// until every SA was re-established, the sample's pings lost.
	RotationFetches float64 `json:"rotation_key_service_requests"`
	RotationSeconds float64 `json:"rotation_seconds"`
	RotationRekeyed int64   `json:"rotation_sas_reestablished"`
	GraceSeconds    float64 `json:"grace_seconds"`
	SamplePingsSent int64   `json:"sample_pings_sent"`
	SamplePingsLost int64   `json:"sample_pings_lost"`
	// Of those lost, how many were sent before the rotation (in the
	// --duration of traffic before it).
	SamplePingsLostBefore int64 `json:"sample_pings_lost_before_rotation"`
	// Why pings were lost: the first few lost (which SA, when, on which
	// SPI), replies the generator could not place or open, pings it
	// could not send (not counted as sent), the server's drops by cause
	// and the machine's UDP receive-buffer overflows (-1 where the
	// system does not say) during the rotation.
	SampleLost        []LostPing         `json:"sample_pings_lost_detail,omitempty"`
	SampleUnknownSPI  int64              `json:"sample_replies_unknown_spi"`
	SampleUnopened    int64              `json:"sample_replies_not_opened"`
	SampleSendErrors  int64              `json:"sample_pings_not_sent"`
	RotationDrops     map[string]float64 `json:"rotation_server_drops,omitempty"`
	RotationUDPErrors int64              `json:"rotation_udp_receive_buffer_errors"`
}

// benchSA is one SA as the load generator keeps it: what it needs to
// answer the server's notices and to make the SA again.
type benchSA struct {
	n        int // its number: the client's overlay address and certificate
	creds    *clientCreds
	sock     *genSocket
	session  *handshake.Session
	gen      keys.Generation
	rekeyed  atomic.Bool
	rekeying atomic.Bool
	// The sample's data path: both CKs of the current SA (and the one
	// before, for replies in flight).
	mu       sync.Mutex
	out      *sa.Outbound
	in, prev *sa.Inbound
}

// clientCreds is a client's certificate and key, compact (credentials are
// made from them when a handshake needs them).
type clientCreds struct {
	der []byte
	key []byte // Ed25519 private key
}

// genSocket is one source address of the load generator; the server's
// flood guard limits handshakes per source, so the generator spreads them.
type genSocket struct {
	c       *net.UDPConn
	mu      sync.Mutex
	waiting map[uint32]chan []byte // session index -> a handshake's answers
	sas     map[uint32]*benchSA    // session index -> the SA whose session it is
}

// RunSAS runs the bench.
func RunSAS(ctx context.Context, cfg SASConfig) (*SASReport, error) {
	if cfg.Count <= 0 {
		return nil, errors.New("lab: --count must be positive")
	}
	if cfg.Clients <= 0 {
		cfg.Clients = 64
	}
	if cfg.Sample <= 0 || cfg.Sample > cfg.Count {
		cfg.Sample = min(100, cfg.Count)
	}
	if cfg.Duration <= 0 {
		cfg.Duration = time.Second
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.Progress == nil {
		cfg.Progress = io.Discard
	}
	dir, err := os.MkdirTemp("", "enclave-bench-sas-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	o, err := newOrg(dir, cfg.Log)
	if err != nil {
		return nil, err
	}
	defer o.stop()
	b := &bench{cfg: cfg, o: o, ctx: ctx, rep: &SASReport{Count: cfg.Count, Clients: cfg.Clients}}
	return b.run()
}

type bench struct {
	cfg     SASConfig
	o       *org
	ctx     context.Context
	rep     *SASReport
	srv     *exec.Cmd
	log     *syncBuffer
	metrics metricsAddr // the server's
	data    netip.AddrPort
	ctrl    netip.AddrPort
	socks   []*genSocket
	sas     []*benchSA
	creds   []*clientCreds
	grace   time.Duration
}

func (b *bench) progress(format string, a ...any) {
	if b.cfg.Terminal {
		fmt.Fprintf(b.cfg.Progress, "\r\033[K"+format, a...)
	} else {
		fmt.Fprintf(b.cfg.Progress, format+"\n", a...)
	}
}

func (b *bench) run() (*SASReport, error) {
	start := time.Now()
	if err := b.setup(); err != nil {
		return nil, err
	}
	defer b.stopServer()
	b.metrics.collect()
	b.rep.RSSBefore, b.rep.HeapBefore = b.metrics.value("process_resident_memory_bytes"), b.metrics.value("go_memstats_heap_alloc_bytes")
	cpu0 := b.metrics.value("process_cpu_seconds_total")
	profiled := make(chan struct{})
	if path := os.Getenv("ENCLAVE_BENCH_CPU_PROFILE"); path != "" { // where the server's CPU goes: 10 s of the build-up
		go func() {
			defer close(profiled)
			b.saveProfile("/debug/pprof/profile?seconds=10", path)
		}()
	} else {
		close(profiled)
	}
	if err := b.buildUp(); err != nil {
		return nil, err
	}
	<-profiled
	cpu1 := b.metrics.value("process_cpu_seconds_total")
	b.rep.CPUPer1000 = (cpu1 - cpu0) / float64(b.cfg.Count) * 1000
	b.settle()
	b.metrics.collect()
	b.rep.RSSAfter, b.rep.HeapAfter = b.metrics.value("process_resident_memory_bytes"), b.metrics.value("go_memstats_heap_alloc_bytes")
	b.rep.ServerRSS, b.rep.ServerSAs = b.rep.RSSAfter, b.metrics.value("enclave_agent_sas")
	b.rep.RSSPerSA = (b.rep.RSSAfter - b.rep.RSSBefore) / float64(b.cfg.Count)
	b.rep.HeapPerSA = (b.rep.HeapAfter - b.rep.HeapBefore) / float64(b.cfg.Count)
	b.rep.HierarchyKeys = b.metrics.value("enclave_agent_server_keys")
	if path := os.Getenv("ENCLAVE_BENCH_HEAP_PROFILE"); path != "" { // where the server's memory goes
		b.saveProfile("/debug/pprof/heap", path)
	}
	if err := b.rotate(); err != nil {
		return nil, err
	}
	if reqs, err := b.metrics.series("enclave_agent_keyservice_requests_total{"); err == nil {
		b.rep.ServerRequests = map[string]float64{}
		for k, v := range reqs {
			rpc := strings.TrimSuffix(strings.TrimPrefix(k, `enclave_agent_keyservice_requests_total{rpc="`), `"}`)
			b.rep.ServerRequests[rpc] = v
		}
	}
	b.rep.Seconds = time.Since(start).Seconds()
	if b.cfg.Terminal {
		fmt.Fprint(b.cfg.Progress, "\r\033[K")
	}
	return b.rep, nil
}

// setup starts the key service, registers the server and the clients'
// enclave, and starts the server agent as a process of this binary.
func (b *bench) setup() error {
	o := b.o
	b.progress("setting up the key service and the server agent")
	// The grace leaves room to re-establish every SA at a few hundred
	// handshakes a second: the server spreads its notices over half of it.
	b.grace = max(30*time.Second, time.Duration(b.cfg.Count)*3*time.Millisecond).Truncate(time.Second)
	b.rep.GraceSeconds = b.grace.Seconds()
	if b.cfg.Spread <= 0 || b.cfg.Spread > b.grace/2 {
		b.cfg.Spread = b.grace / 2
	}
	if err := o.startOrgTier(b.ctx, "ks", registry.Rotation{Interval: sasInterval, Grace: b.grace}); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(b.ctx, 10*time.Second)
	defer cancel()
	k := uint32(1)
	for _, c := range []func() error{
		func() error {
			_, err := o.admin.AddEnclave(ctx, &api.AddEnclaveRequest{Id: 3, Name: "servers"})
			return err
		},
		func() error {
			_, err := o.admin.AddEnclave(ctx, &api.AddEnclaveRequest{Id: 7, Name: "clients"})
			return err
		},
		func() error { _, err := o.admin.AllowPair(ctx, &api.AllowPairRequest{A: 3, B: 7}); return err },
		func() error {
			_, err := o.admin.AddDevice(ctx, &api.AddDeviceRequest{Name: "srv", Role: "server", Enclave: 3, ServerId: &k})
			return err
		},
	} {
		if err := c(); err != nil {
			return err
		}
	}
	if _, err := o.issue(ca.Identity{Name: "srv", Role: ca.RoleServer, Enclave: 3, ServerID: 1, HasServerID: true, Overlay: netip.MustParsePrefix("100.64.0.1/10")}); err != nil {
		return err
	}
	bin, err := os.Executable()
	if err != nil {
		return err
	}
	dataPort, metricsPort, err := freePorts()
	if err != nil {
		return err
	}
	b.data = netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), dataPort)
	b.ctrl = netip.AddrPortFrom(b.data.Addr(), dataPort+1)
	b.metrics = metricsAddr(fmt.Sprintf("127.0.0.1:%d", metricsPort))
	b.log = &syncBuffer{}
	b.srv = exec.Command(bin, "agent", "--ca", "ca/ca.crt", "--cert", "certs/srv.crt", "--key", "certs/srv.key",
		"--keyserver", o.servers["ks"].addr, "--server-name", "127.0.0.1", "--listen", b.data.String(), "--netstack",
		"--metrics-listen", string(b.metrics), "--rekey-spread", b.cfg.Spread.String(), "--pprof")
	b.srv.Dir = o.dir
	b.srv.Stdout, b.srv.Stderr = b.log, b.log
	if err := b.srv.Start(); err != nil {
		return err
	}
	if !waitFor(15*time.Second, func() bool { return strings.Contains(b.log.String(), "agent listening") }) {
		return fmt.Errorf("lab: the server agent did not start:\n%s", tail(b.log.String(), 1500))
	}
	// Sources: 1,024 loopback addresses, so that the server's limit per
	// source does not throttle the generator.
	for i := 0; i < 1024; i++ {
		a := netip.AddrFrom4([4]byte{127, 3, byte(i >> 8), byte(i)})
		c, err := net.ListenUDP("udp4", net.UDPAddrFromAddrPort(netip.AddrPortFrom(a, 0)))
		if err != nil {
			return err
		}
		c.SetReadBuffer(1 << 20)
		s := &genSocket{c: c, waiting: map[uint32]chan []byte{}, sas: map[uint32]*benchSA{}}
		b.socks = append(b.socks, s)
		o.onStop(func() { c.Close() })
		go b.readSocket(s)
	}
	b.progress("issuing %d client certificates", b.cfg.Count)
	return b.issueClients()
}

// freePorts finds a data port whose next port is free too, and a metrics
// port.
func freePorts() (uint16, uint16, error) {
	for try := 0; try < 100; try++ {
		a, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			return 0, 0, err
		}
		p := uint16(a.LocalAddr().(*net.UDPAddr).Port)
		c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: int(p) + 1})
		a.Close()
		if err != nil || p == 65535 {
			continue
		}
		c.Close()
		m, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return 0, 0, err
		}
		mp := uint16(m.Addr().(*net.TCPAddr).Port)
		m.Close()
		return p, mp, nil
	}
	return 0, 0, errors.New("lab: no free pair of ports")
}

func (b *bench) stopServer() {
	if b.srv != nil && b.srv.Process != nil {
		b.srv.Process.Signal(os.Interrupt)
		waitOrKill(b.srv, 10*time.Second)
	}
}

// saveProfile writes one of the server's pprof profiles to path.
func (b *bench) saveProfile(endpoint, path string) {
	if err := b.metrics.saveProfile(endpoint, path); err != nil {
		b.progress("profile %s: %v", endpoint, err)
	}
}

// overlayOf is client n's overlay address (in 100.64.0.0/10, past the
// server's).
func overlayOf(n int) netip.Addr {
	v := uint32(100)<<24 | uint32(64)<<16 + uint32(n) + 2
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}

// issueClients issues every client's certificate (in parallel).
func (b *bench) issueClients() error {
	b.creds = make([]*clientCreds, b.cfg.Count)
	var wg sync.WaitGroup
	var first error
	var once sync.Once
	workers := 4
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for n := w; n < b.cfg.Count; n += workers {
				id := ca.Identity{Name: "c" + strconv.Itoa(n), Role: ca.RoleClient, Enclave: 7, Overlay: netip.PrefixFrom(overlayOf(n), 10)}
				is, err := b.o.auth.Issue(id, nil, 30, b.o.now.Add(-time.Minute))
				if err != nil {
					once.Do(func() { first = err })
					return
				}
				key, err := ca.ParseKeyPEM(is.KeyPEM)
				if err != nil {
					once.Do(func() { first = err })
					return
				}
				b.creds[n] = &clientCreds{der: is.Cert.Raw, key: key}
			}
		}()
	}
	wg.Wait()
	return first
}

// readSocket delivers each answer on a generator socket to the handshake
// waiting for it, and each sealed message to its SA.
func (b *bench) readSocket(s *genSocket) {
	buf := make([]byte, control.MaxMessage+1)
	for {
		n, _, err := s.c.ReadFromUDPAddrPort(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue
		}
		msg := buf[:n]
		h, err := control.ParseHeader(msg)
		if err != nil {
			continue
		}
		var idx uint32
		switch h.Type {
		case control.TypeResponse:
			if r, err := control.ParseResponse(msg); err == nil {
				idx = r.Receiver
			}
		case control.TypeCookieReply:
			idx = h.Sender
		case control.TypeSealed:
			if sm, err := control.ParseSealed(msg); err == nil {
				idx = sm.Receiver
			}
		}
		s.mu.Lock()
		ch, sa := s.waiting[idx], s.sas[idx]
		s.mu.Unlock()
		if sa != nil && h.Type == control.TypeSealed {
			go b.onSealed(sa, append([]byte(nil), msg...))
			continue
		}
		if ch != nil {
			select {
			case ch <- append([]byte(nil), msg...):
			default:
			}
		}
	}
}

// handshake makes SA n (or makes it again): an initiation from its
// socket, a cookie answered if the server asks, a retry after a second of
// silence; it returns the session, the grant and how long it took.
func (b *bench) handshake(n int, sock *genSocket) (*handshake.Session, *control.Grant, time.Duration, error) {
	cc := b.creds[n]
	cert, err := parseCert(cc.der)
	if err != nil {
		return nil, nil, 0, err
	}
	creds, err := handshake.NewCredentials(b.o.auth.Roots(), cert, cc.key)
	if err != nil {
		return nil, nil, 0, err
	}
	start := time.Now()
	for try := 0; try < 10; try++ {
		idx := newIndex()
		ch := make(chan []byte, 4)
		sock.mu.Lock()
		sock.waiting[idx] = ch
		sock.mu.Unlock()
		init, msg, err := handshake.Initiate(creds, idx, time.Now())
		if err != nil {
			return nil, nil, 0, err
		}
		sess, grant, err := b.exchange(sock, init, msg, ch)
		sock.mu.Lock()
		delete(sock.waiting, idx)
		sock.mu.Unlock()
		if err == nil {
			return sess, grant, time.Since(start), nil
		}
		if errors.Is(err, errRefusedSA) {
			return nil, nil, 0, err
		}
		atomic.AddInt64(&b.rep.Retries, 1)
	}
	return nil, nil, 0, fmt.Errorf("lab: SA %d: no answer after 10 tries", n)
}

var errRefusedSA = errors.New("lab: the server refused the SA")

func (b *bench) exchange(sock *genSocket, init *handshake.Initiator, msg []byte, ch chan []byte) (*handshake.Session, *control.Grant, error) {
	sock.c.WriteToUDPAddrPort(msg, b.ctrl)
	timeout := time.After(time.Second)
	for {
		select {
		case <-b.ctx.Done():
			return nil, nil, b.ctx.Err()
		case <-timeout:
			return nil, nil, errors.New("timeout")
		case ans := <-ch:
			h, _ := control.ParseHeader(ans)
			if h.Type == control.TypeCookieReply {
				_, cookie, err := control.ParseCookieReply(ans)
				if err != nil {
					continue
				}
				atomic.AddInt64(&b.rep.Cookies, 1)
				sock.c.WriteToUDPAddrPort(init.WithCookie(cookie), b.ctrl)
				continue
			}
			if h.Type != control.TypeResponse {
				continue
			}
			res, err := init.Complete(ans, time.Now())
			if err != nil {
				return nil, nil, err
			}
			if res.Payload.Grant == nil {
				return nil, nil, fmt.Errorf("%w: %s", errRefusedSA, res.Payload.Reason)
			}
			return res.Session, res.Payload.Grant, nil
		}
	}
}

func newIndex() uint32 {
	for {
		var x [4]byte
		rand.Read(x[:])
		if v := binary.BigEndian.Uint32(x[:]); v != 0 {
			return v
		}
	}
}

// buildUp brings the SAs up with Clients workers.
func (b *bench) buildUp() error {
	b.sas = make([]*benchSA, b.cfg.Count)
	lat := make([]time.Duration, b.cfg.Count)
	done := make([]time.Time, b.cfg.Count)
	var next, up atomic.Int64
	errs := make(chan error, b.cfg.Clients)
	start := time.Now()
	stop := make(chan struct{})
	go func() { // progress
		t := time.NewTicker(500 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-stop:
				return
			case <-t.C:
				n := up.Load()
				b.progress("SAs up: %d/%d (%.0f handshakes/s)", n, b.cfg.Count, float64(n)/time.Since(start).Seconds())
			}
		}
	}()
	var wg sync.WaitGroup
	for w := 0; w < b.cfg.Clients; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				n := int(next.Add(1) - 1)
				if n >= b.cfg.Count || b.ctx.Err() != nil {
					return
				}
				sock := b.socks[n%len(b.socks)]
				sess, g, d, err := b.handshake(n, sock)
				if err != nil {
					errs <- fmt.Errorf("SA %d: %w", n, err)
					return
				}
				s := &benchSA{n: n, creds: b.creds[n], sock: sock, session: sess, gen: keys.Generation(g.Generation)}
				if n < b.cfg.Sample {
					if err := s.install(g); err != nil {
						errs <- err
						return
					}
				}
				b.sas[n], lat[n], done[n] = s, d, time.Now()
				sock.mu.Lock()
				sock.sas[sess.Local] = s // its sealed messages come here
				sock.mu.Unlock()
				up.Add(1)
			}
		}()
	}
	wg.Wait()
	close(stop)
	select {
	case err := <-errs:
		return err
	default:
	}
	if err := b.ctx.Err(); err != nil {
		return err
	}
	total := time.Since(start)
	b.rep.Rate = float64(b.cfg.Count) / total.Seconds()
	slices.SortFunc(done, func(a, c time.Time) int { return a.Compare(c) })
	tenth := max(b.cfg.Count/10, 1)
	if d := done[tenth-1].Sub(start); d > 0 {
		b.rep.RateFirst = float64(tenth) / d.Seconds()
	}
	if d := done[len(done)-1].Sub(done[len(done)-tenth]); d > 0 {
		b.rep.RateLast = float64(tenth-1) / d.Seconds()
	}
	slices.Sort(lat)
	b.rep.P50ms = float64(lat[len(lat)/2].Microseconds()) / 1000
	b.rep.P99ms = float64(lat[len(lat)*99/100].Microseconds()) / 1000
	return nil
}

// install keeps a sample SA's CKs for its pings.
func (s *benchSA) install(g *control.Grant) error {
	vc := keys.VC{Enclave: keys.EnclaveID(g.Enclave), Peer: keys.EnclaveID(g.Peer), Server: keys.ServerID(g.Server)}
	v := keys.Version(g.PSPVersion)
	out, err := sa.NewOutbound(sa.Config{SPI: keys.SPI(g.SPIOut), VC: vc, Version: v, Key: g.KeyOut})
	if err != nil {
		return err
	}
	in, err := sa.NewInbound(sa.Config{SPI: keys.SPI(g.SPIIn), VC: vc, Version: v, Key: g.KeyIn})
	if err != nil {
		return err
	}
	clear(g.KeyOut)
	clear(g.KeyIn)
	s.mu.Lock()
	s.out, s.prev, s.in = out, s.in, in
	s.mu.Unlock()
	return nil
}

// onSealed handles a server's sealed message on SA s: a rekey notice
// makes the SA again (from the same socket, with a newer initiation).
func (b *bench) onSealed(s *benchSA, msg []byte) {
	sm, err := control.ParseSealed(msg)
	if err != nil {
		return
	}
	s.mu.Lock()
	sess := s.session
	s.mu.Unlock()
	in, err := sess.Open(&sm)
	if err != nil || in.Type != control.InnerRekeyNotice || !s.rekeying.CompareAndSwap(false, true) {
		return
	}
	defer s.rekeying.Store(false)
	var newSess *handshake.Session
	var g *control.Grant
	for {
		newSess, g, _, err = b.handshake(s.n, s.sock)
		if err == nil {
			break
		}
		if errors.Is(err, errRefusedSA) || b.ctx.Err() != nil {
			return
		}
		// The server is busy: try again a little later, as a client
		// whose rekey failed would at its next packet.
		select {
		case <-b.ctx.Done():
			return
		case <-time.After(2 * time.Second):
		}
	}
	if s.n < b.cfg.Sample {
		s.install(g)
	}
	s.sock.mu.Lock()
	delete(s.sock.sas, sess.Local)
	s.sock.sas[newSess.Local] = s
	s.sock.mu.Unlock()
	s.mu.Lock()
	s.session, s.gen = newSess, keys.Generation(g.Generation)
	s.mu.Unlock()
	s.rekeyed.Store(true)
}

// settle waits until the server counts every SA.
func (b *bench) settle() {
	waitFor(10*time.Second, func() bool { return b.metrics.value("enclave_agent_sas") >= float64(b.cfg.Count) })
}

// rotate rotates the pair while the sample pings, and waits until every
// SA is re-established (or the grace ends).
func (b *bench) rotate() error {
	fetches := b.metrics.value(`enclave_agent_keyservice_requests_total{rpc="GetServerKeys"}`)
	drops0, _ := b.metrics.series("enclave_agent_drops_total{")
	udp0, udpErr := udpReceiveErrors()
	var rotated atomic.Pointer[time.Time]
	pinger := b.startPings(&rotated)
	b.progress("traffic on %d sample SAs for %v before the rotation", b.cfg.Sample, b.cfg.Duration)
	select {
	case <-b.ctx.Done():
		pinger()
		return b.ctx.Err()
	case <-time.After(b.cfg.Duration):
	}
	ctx, cancel := context.WithTimeout(b.ctx, 10*time.Second)
	defer cancel()
	b.progress("rotating pair 3-7 under %d SAs", b.cfg.Count)
	// The schedule's rotation: the key service's clock moves on by the
	// rotation interval (a day), and the pair rotates once, now.
	gen0, err := b.generation(ctx)
	if err != nil {
		return err
	}
	start := time.Now()
	rotated.Store(&start)
	b.o.clock.Advance(sasInterval)
	if !waitFor(10*time.Second, func() bool { g, err := b.generation(ctx); return err == nil && g > gen0 }) {
		return errors.New("lab: the scheduled rotation did not happen")
	}
	all := waitFor(b.grace, func() bool {
		n := 0
		for _, s := range b.sas {
			if s.rekeyed.Load() {
				n++
			}
		}
		b.rep.RotationRekeyed = int64(n)
		if b.cfg.Terminal {
			b.progress("re-established: %d/%d", n, b.cfg.Count)
		}
		return n == b.cfg.Count
	})
	b.rep.RotationSeconds = time.Since(start).Seconds()
	time.Sleep(time.Second)
	ps := pinger()
	b.rep.SamplePingsSent, b.rep.SamplePingsLost, b.rep.SamplePingsLostBefore = ps.sent, ps.lost, ps.lostBefore
	b.rep.SampleLost, b.rep.SampleUnknownSPI, b.rep.SampleUnopened, b.rep.SampleSendErrors = ps.lostDetail, ps.unknownSPI, ps.unopened, ps.sendErrors
	if drops1, err := b.metrics.series("enclave_agent_drops_total{"); err == nil {
		for k, v := range drops1 {
			if d := v - drops0[k]; d > 0 {
				if b.rep.RotationDrops == nil {
					b.rep.RotationDrops = map[string]float64{}
				}
				b.rep.RotationDrops[strings.TrimPrefix(k, "enclave_agent_drops_total")] = d
			}
		}
	}
	b.rep.RotationUDPErrors = -1
	if udp1, err := udpReceiveErrors(); err == nil && udpErr == nil {
		b.rep.RotationUDPErrors = udp1 - udp0
	}
	b.rep.RotationFetches = b.metrics.value(`enclave_agent_keyservice_requests_total{rpc="GetServerKeys"}`) - fetches
	if !all {
		var lines []string
		for _, l := range strings.Split(b.log.String(), "\n") {
			if !strings.Contains(l, "SA granted") {
				lines = append(lines, l)
			}
		}
		return fmt.Errorf("lab: %d of %d SAs re-established within the grace (%v); the server's log ends:\n%s", b.rep.RotationRekeyed, b.cfg.Count, b.grace, tail(strings.Join(lines, "\n"), 3000))
	}
	return nil
}

// sasInterval is the bench key service's rotation schedule.
const sasInterval = 24 * time.Hour

// generation reads pair 3-7's current generation.
func (b *bench) generation(ctx context.Context) (uint32, error) {
	st, err := b.o.admin.Status(ctx, &api.StatusRequest{})
	if err != nil {
		return 0, err
	}
	for _, p := range st.GetPairs() {
		if p.GetPair().GetA() == 3 && p.GetPair().GetB() == 7 {
			return p.GetGeneration(), nil
		}
	}
	return 0, errors.New("lab: no pair 3-7")
}

// parseCert parses a client's certificate for its credentials.
func parseCert(der []byte) (*x509.Certificate, error) { return x509.ParseCertificate(der) }
