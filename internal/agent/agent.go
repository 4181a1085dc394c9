package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"golang.zx2c4.com/wireguard/tun"
	"golang.zx2c4.com/wireguard/tun/netstack"

	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/discovery"
	"github.com/enclavekeys/enclave/internal/handshake"
	"github.com/enclavekeys/enclave/internal/keyclient"
	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/sa"
)

// Agent is a running host agent. Create it with New, start it with Run.
type Agent struct {
	cfg Config
	// creds are the certificate, key and roots handshakes use now
	// (cfg.Credentials, or what SetCredentials put).
	creds atomic.Pointer[handshake.Credentials]
	// selfRevoked: the key service revoked this device (revokedSelf).
	selfRevoked atomic.Bool
	// credsChanged wakes the directory registration when SetCredentials
	// puts new ones in force.
	credsChanged chan struct{}
	id           ca.Identity
	self         netip.Addr // this device's overlay address
	// overlayNet is the overlay network its certificate names.
	overlayNet netip.Prefix
	log        *slog.Logger
	metrics    *Metrics

	data, ctrl *net.UDPConn
	tun        tun.Device
	net        *netstack.Net

	guard *handshake.Guard
	icmp  icmpLimiter // errors for inner packets over the MTU
	// Recovery (recover.go): UnknownSA answers a server sends, handshakes
	// a client makes for servers that send on SAs it does not hold.
	hints, recoveries *rateLimiter
	// Server side: discovery, the server keys and the stateless opener.
	disc *discovery.Decider
	// sizeWarned: the log said once that initiations are too large for
	// gateways to tag within control.MaxHandshake.
	sizeWarned atomic.Bool
	own        *ownAddrs // where a gateway's path entry must say it sent a handshake
	table      *sa.KeyTable
	opener     *sa.Opener

	mu    sync.RWMutex
	t     tables
	dials map[netip.Addr]*dial // client: handshakes in flight, by destination
	// resolved and failed are the directory's answers (directory.go):
	// routes looked up, and when a lookup last failed, by destination.
	resolved map[netip.Addr]resolved
	failed   map[netip.Addr]time.Time
	pending  map[uint32]*dial     // the same, by session index
	last     map[string]time.Time // server: the newest initiation timestamp per initiator
	revoked  map[string]bool      // devices the key service says are revoked
	sks      map[skID]*serverKey  // server: SK derivers by peer enclave and generation
	// Server: intermediaries' control sessions (by session index and by
	// name, the newest) and the key deliveries waiting for one.
	gws        map[uint32]*gwSession
	gwByName   map[string]*gwSession
	deliveries map[string][]*delivery
	acks       map[ackKey]func() // deliveries awaiting their gateway's KeyAck

	// coarse is the time in Unix milliseconds, set by the timers: the
	// receive path stamps proofs of path with it without reading a clock
	// per packet.
	coarse atomic.Int64
	// certWarn says when this agent's certificate ends soon (the timers'
	// goroutine only).
	certWarn handshake.CertWarner

	ctx       context.Context   // set by Run before anything reads it
	ready     chan struct{}     // closed when Run has started everything
	started   time.Time         // when Run started, for status
	ks        keyclient.Tracker // the key service connection, for status
	stop      chan struct{}     // closed by Close
	closeOnce sync.Once
	downOnce  sync.Once
	wg        sync.WaitGroup
	rx        sync.WaitGroup // the receive path's goroutines (shutdown waits for them)
	// server: this agent grants SAs (a server certificate and a key
	// service). A client with a key service follows its revocations only.
	server bool
	// snapshot is closed when the key service's watch has given every
	// revocation (its first SNAPSHOT_DONE).
	snapshot     chan struct{}
	snapshotOnce sync.Once
}

// New sets up an agent: the network stack with the certificate's overlay
// address, and the data and control ports. Nothing runs until Run.
func New(cfg Config) (*Agent, error) {
	c := cfg.withDefaults()
	if c.Credentials == nil {
		return nil, fmt.Errorf("%w: no credentials", ErrConfig)
	}
	id, err := ca.IdentityOf(c.Credentials.Cert)
	if err != nil {
		return nil, err
	}
	if !id.Overlay.IsValid() {
		return nil, ErrNoOverlay
	}
	if c.KeyService != nil && id.Role != ca.RoleServer && id.Role != ca.RoleClient {
		return nil, fmt.Errorf("%w: a key service is for servers (their keys) and clients (revocations); this certificate is a %s's", ErrConfig, id.Role)
	}
	a := &Agent{
		cfg: c, id: id, self: id.Overlay.Addr(), overlayNet: id.Overlay.Masked(), log: c.Logger.With("agent", id.Name), metrics: newMetrics(),
		guard: handshake.NewGuard(c.Guard, c.Now()),
		t:     newTables(c.IdleTimeout, c.RekeyBefore), dials: map[netip.Addr]*dial{}, pending: map[uint32]*dial{},
		resolved: map[netip.Addr]resolved{}, failed: map[netip.Addr]time.Time{},
		last: map[string]time.Time{}, revoked: map[string]bool{}, sks: map[skID]*serverKey{},
		gws: map[uint32]*gwSession{}, gwByName: map[string]*gwSession{}, deliveries: map[string][]*delivery{}, acks: map[ackKey]func(){},
		ready: make(chan struct{}), stop: make(chan struct{}),
		hints: newRateLimiter(hintEvery, hintsPerSecond), recoveries: newRateLimiter(recoverEvery, 0),
		server: c.KeyService != nil && id.Role == ca.RoleServer, snapshot: make(chan struct{}),
	}
	a.creds.Store(c.Credentials)
	a.credsChanged = make(chan struct{}, 1)
	a.coarse.Store(c.Now().UnixMilli())
	a.started = c.Now().UTC()
	a.ks.Set(keyclient.Connecting, a.started, nil)
	if a.server {
		a.disc = discovery.New(discovery.Config{Roots: c.Credentials.Roots, Own: id.Enclave, TrustUnsigned: c.TrustUnsigned, Revoked: a.isRevoked,
			Addressed: func(to netip.AddrPort) bool { return a.own.addressed(to) }})
		a.table = sa.NewKeyTable(1024)
		a.opener = sa.NewOpener(a.table, 4096)
	}
	if c.Via.IsValid() && (c.Via.Port() == 0 || c.Via.Port() == 65535) {
		return nil, fmt.Errorf("%w: the relay's data port must be 1 to 65534 (its control port is the next one)", ErrConfig)
	}
	if c.Listen.Port() == 65535 {
		return nil, fmt.Errorf("%w: the data port cannot be 65535 (the control port is the next one)", ErrConfig)
	}
	if a.data, a.ctrl, err = listenPair(c.Listen); err != nil {
		return nil, err
	}
	var public []netip.AddrPort
	for _, p := range c.Public {
		if p.Port() == 0 || p.Port() == 65535 {
			a.data.Close()
			a.ctrl.Close()
			return nil, fmt.Errorf("%w: public endpoint %s: the data port must be 1 to 65534 (the control port is the next one)", ErrConfig, p)
		}
		public = append(public, netip.AddrPortFrom(p.Addr(), p.Port()+1))
	}
	a.own = newOwnAddrs(a.ctrl.LocalAddr().(*net.UDPAddr).AddrPort(), public, c.Now)
	// Large socket buffers: a burst the reader has not caught up with yet
	// waits in the kernel instead of being lost (the kernel caps the size
	// at net.core.rmem_max and wmem_max; errors only mean a smaller buffer).
	a.data.SetReadBuffer(socketBuffer)
	a.data.SetWriteBuffer(socketBuffer)
	if c.TUN != "" {
		a.tun, err = openTUN(c.TUN, c.MTU, id.Overlay, c.Routes)
	} else if a.tun, a.net, err = netstack.CreateNetTUN([]netip.Addr{a.self}, nil, c.MTU); err != nil {
		err = fmt.Errorf("agent: network stack: %w", err)
	}
	if err != nil {
		a.data.Close()
		a.ctrl.Close()
		return nil, err
	}
	return a, nil
}

// listenPair binds the data port at listen and the control port after
// it. Port 0 takes a free pair from the kernel: an ephemeral data port
// whose next port is taken is given back and another tried, so that a
// pair is found whatever else runs (issue 32: a test that bound "a port
// after an ephemeral one" failed when it was in use).
func listenPair(listen netip.AddrPort) (data, ctrl *net.UDPConn, err error) {
	for try := 0; ; try++ {
		if data, err = net.ListenUDP("udp", net.UDPAddrFromAddrPort(listen)); err != nil {
			return nil, nil, fmt.Errorf("agent: data port: %w", err)
		}
		ctrlAddr := netip.AddrPortFrom(listen.Addr(), data.LocalAddr().(*net.UDPAddr).AddrPort().Port()+1)
		if ctrlAddr.Port() != 0 {
			if ctrl, err = net.ListenUDP("udp", net.UDPAddrFromAddrPort(ctrlAddr)); err == nil {
				return data, ctrl, nil
			}
		} else {
			err = errors.New("the data port is 65535, with no port after it")
		}
		data.Close()
		if listen.Port() != 0 || try >= 64 {
			return nil, nil, fmt.Errorf("agent: control port %s: %w", ctrlAddr, err)
		}
	}
}

// SetCredentials replaces the device's certificate, key and trusted CAs
// (a reload after enclave cert renew, or during a CA rollover): handshakes
// from now on use them, SAs and sessions up go on. The certificate must
// be valid under the new CAs and carry the same identity.
func (a *Agent) SetCredentials(c *handshake.Credentials) error {
	if err := c.Replaces(a.id, a.cfg.Now()); err != nil {
		return fmt.Errorf("%w: %v", ErrConfig, err)
	}
	a.creds.Store(c)
	select {
	case a.credsChanged <- struct{}{}:
	default:
	}
	if a.disc != nil {
		a.disc.SetRoots(c.Roots)
	}
	return nil
}

// Identity is the agent's own identity.
func (a *Agent) Identity() ca.Identity { return a.id }

// Addr is the agent's overlay address.
func (a *Agent) Addr() netip.Addr { return a.self }

// DataPort is the address of the data port (the control port is the next).
func (a *Agent) DataPort() netip.AddrPort { return a.data.LocalAddr().(*net.UDPAddr).AddrPort() }

// Net is the agent's in-process network stack: programs dial and listen
// on it, and their packets travel over the agent's SAs. It is nil for an
// agent on a kernel TUN device (programs use the host's own stack then).
func (a *Agent) Net() *netstack.Net { return a.net }

// TUNName is the kernel TUN device's name, or "" on the in-process stack.
func (a *Agent) TUNName() string {
	if a.cfg.TUN == "" {
		return ""
	}
	n, _ := a.tun.Name()
	return n
}

// Metrics are the agent's Prometheus metrics.
func (a *Agent) Metrics() *Metrics { return a.metrics }

// Run carries traffic until ctx ends or Close is called. A server first
// fetches its keys from the key service: while the service cannot be
// reached it tries again with backoff (it may start before the key
// service), logging every few seconds; a refusal (revoked, unknown) ends
// Run with the error.
func (a *Agent) Run(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() { // Close ends Run, and a wait for the key service with it
		select {
		case <-a.stop:
			cancel()
		case <-ctx.Done():
		}
	}()
	a.ctx = ctx
	if a.cfg.KeyService != nil {
		var err error
		if a.server {
			err = keyclient.Retry(ctx, a.log, "server keys", a.cfg.KeyServiceAddr, a.fetchKeys)
		}
		if err == nil {
			// Serve only once every revocation is known: the watch's
			// snapshot comes first.
			a.spawn(a.watchKeys)
			select {
			case <-a.snapshot:
			case <-ctx.Done():
				err = ctx.Err()
			}
		}
		if err != nil {
			cancel()
			a.shutdown()
			a.wg.Wait()
			return err
		}
	}
	a.spawn(a.readTUN)
	a.rx.Add(1)
	a.spawn(func() { defer a.rx.Done(); a.readData() })
	a.spawn(a.readControl)
	a.spawn(a.timers)
	if a.server && a.id.Overlay.IsValid() {
		a.spawn(a.registerEndpoints) // the endpoint directory: clients find it without --peer
	}
	a.log.Info("agent up", "overlay", a.self, "data", a.DataPort(), "role", string(a.id.Role), "enclave", a.id.Enclave)
	close(a.ready)
	select {
	case <-ctx.Done():
	case <-a.stop:
	}
	cancel()
	a.shutdown()
	a.wg.Wait()
	return nil
}

// Ready is closed once Run has started the agent.
func (a *Agent) Ready() <-chan struct{} { return a.ready }

func (a *Agent) spawn(f func()) {
	a.wg.Add(1)
	go func() {
		defer a.wg.Done()
		f()
	}()
}

// Close stops the agent: a running Run returns, and an agent that never
// ran releases its ports.
func (a *Agent) Close() {
	a.closeOnce.Do(func() {
		close(a.stop)
		select {
		case <-a.ready:
		default:
			a.shutdown()
		}
	})
}

// shutdown closes the sockets and the stack (once), ending the readers.
// The receive path stops before the stack closes: a packet it hands the
// in-process stack after that would make the stack answer into a closed
// device (wireguard-go's netstack panics then).
func (a *Agent) shutdown() {
	a.downOnce.Do(func() {
		a.data.Close()
		a.ctrl.Close()
		stopped := make(chan struct{})
		go func() { a.rx.Wait(); close(stopped) }()
		select {
		case <-stopped:
		case <-time.After(5 * time.Second): // a write stuck in the device
		}
		a.tun.Close()
	})
}

// isRevoked reports whether the key service said name is revoked.
func (a *Agent) isRevoked(name string) bool {
	a.mu.RLock()
	defer a.mu.RUnlock()
	return a.revoked[name]
}

// SAs returns how many SAs the agent holds.
func (a *Agent) SAs() int {
	a.mu.RLock()
	defer a.mu.RUnlock()
	return len(a.t.bySPI)
}

// routeFor finds where to initiate an SA for dst: the routes given
// (--peer), then what the directory answered (called under a.mu).
func (a *Agent) routeFor(dst netip.Addr) (Route, bool) {
	best, found := Route{}, false
	for _, r := range a.cfg.Routes {
		if r.Prefix.Contains(dst) && (!found || r.Prefix.Bits() > best.Prefix.Bits()) {
			best, found = r, true
		}
	}
	if !found {
		if r, ok := a.resolved[dst]; ok && a.cfg.Now().Before(r.until) {
			return r.route, true
		}
	}
	return best, found
}

// Association describes one SA the agent holds (for reports and maps; no
// key material).
type Association struct {
	Peer       string // the peer's device name
	Server     bool   // this agent granted the SA (it is the server)
	VC         keys.VC
	Generation keys.Generation
	RecvSPI    keys.SPI
	SendSPI    keys.SPI
	Expires    time.Time
}

// Associations lists the SAs the agent holds.
func (a *Agent) Associations() []Association {
	a.mu.RLock()
	defer a.mu.RUnlock()
	out := make([]Association, 0, len(a.t.bySPI))
	for _, c := range a.t.bySPI {
		out = append(out, Association{Peer: c.peer.Name, Server: c.server, VC: c.vc, Generation: c.gen, RecvSPI: c.recvSPI, SendSPI: c.sendSPI, Expires: c.expires})
	}
	return out
}
