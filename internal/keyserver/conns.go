package keyserver

import (
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/enclavekeys/enclave/internal/ca"
)

// Bounds on the connections one key server holds (issue 36): a fleet's
// reconnect storm, or an enrolled host opening connections without end,
// must not take the memory and file descriptors every other host's
// connection needs.
const (
	// DefaultMaxConnections bounds the connections one replica holds:
	// twice DefaultMaxWatchers and some, since a watching agent holds
	// its watch's connection and, for GRPCIdle after each call (after a
	// rotation, every server of its pairs at once), a gRPC one.
	DefaultMaxConnections = 45000
	// DefaultMaxConnectionsPerDevice bounds one device's (an agent needs
	// two; admin tools and a reload open a few more for a while).
	DefaultMaxConnectionsPerDevice = 16
	// HandshakeTimeout bounds a connection's TLS handshake: one that
	// never finishes holds a place only this long.
	HandshakeTimeout = 10 * time.Second
	// MaxHandshakesPerSource bounds the connections one address holds
	// before they are authenticated: without a certificate, nobody fills
	// the replica's places with handshakes that never end.
	MaxHandshakesPerSource = 64
	// MaxHandshakesPerSubnet bounds those of one IPv6 /64 (a host may
	// hold a whole /64; a cloud subnet is one /64 shared by many hosts,
	// which one of them must not lock out with 64 handshakes).
	MaxHandshakesPerSubnet = 1024
	// Connections without a client certificate (hosts joining with a
	// token: they may call nothing else) have places of their own:
	// MaxAnonymous in all, MaxAnonymousPerSource from one address and
	// MaxAnonymousPerSubnet from one IPv6 /64, each for at most
	// AnonymousLifetime.
	MaxAnonymous          = 1024
	MaxAnonymousPerSource = 16
	MaxAnonymousPerSubnet = 256
	AnonymousLifetime     = time.Minute
)

// ErrTooManyConnections: a connection past a bound, closed at once.
var ErrTooManyConnections = errors.New("keyserver: too many connections")

// ConnGuard counts the connections a key server holds and refuses those
// past its bounds: past the replica's at accept (the connection is closed
// before its handshake), past a device's once its certificate names it.
// Both are counted (enclave_keyserver_connections_refused_total) and the
// device's logged, at most once a minute per device.
type ConnGuard struct {
	max, perDevice int
	log            *slog.Logger
	open           atomic.Int64
	mu             sync.Mutex
	byDevice       map[string]int
	handshaking    map[string]int // by source address
	anonymous      map[string]int // by source address, without a certificate
	anonymousAll   int
	logged         map[string]time.Time
	refused        *prometheus.CounterVec
}

// NewConnGuard makes a guard with these bounds (0: the defaults),
// exporting its figures in m (nil: none).
func NewConnGuard(max, perDevice int, m *Metrics, log *slog.Logger) *ConnGuard {
	if max <= 0 {
		max = DefaultMaxConnections
	}
	if perDevice <= 0 {
		perDevice = DefaultMaxConnectionsPerDevice
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	g := &ConnGuard{max: max, perDevice: perDevice, log: log, byDevice: map[string]int{}, handshaking: map[string]int{}, anonymous: map[string]int{}, logged: map[string]time.Time{},
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "enclave_keyserver_connections_refused_total", Help: "Connections closed at once, by the bound they were past (replica: --max-connections; device: --max-connections-per-device, by certificate; source: 64 in their handshake from one address; anonymous: without a certificate, 1,024 in all or 16 from one address).",
		}, []string{"bound"})}
	if m != nil {
		m.registry.MustRegister(g.refused, prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "enclave_keyserver_connections", Help: "Connections this replica holds (bounded by --max-connections).",
		}, func() float64 { return float64(g.open.Load()) }))
	}
	return g
}

// Open is the number of connections held.
func (g *ConnGuard) Open() int { return int(g.open.Load()) }

// Listener wraps l: a connection accepted past the replica's bound is
// closed at once (the device's retry finds room once others end).
func (g *ConnGuard) Listener(l net.Listener) net.Listener { return &guardedListener{Listener: l, g: g} }

type guardedListener struct {
	net.Listener
	g *ConnGuard
}

// Accept implements net.Listener.
func (l *guardedListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		if l.g.open.Add(1) > int64(l.g.max) {
			l.g.open.Add(-1)
			l.g.refused.WithLabelValues("replica").Inc()
			c.Close()
			continue
		}
		src, subnet := sourcesOf(c.RemoteAddr())
		l.g.mu.Lock()
		if l.g.handshaking[src] >= MaxHandshakesPerSource || l.g.handshaking[subnet] >= MaxHandshakesPerSubnet {
			l.g.mu.Unlock()
			l.g.open.Add(-1)
			l.g.refused.WithLabelValues("source").Inc()
			c.Close()
			continue
		}
		l.g.handshaking[src]++
		l.g.handshaking[subnet]++
		l.g.mu.Unlock()
		gc := &guardedConn{Conn: c, release: func() { l.g.open.Add(-1) }}
		gc.shaken = func() {
			l.g.mu.Lock()
			release(l.g.handshaking, src, subnet)
			l.g.mu.Unlock()
		}
		return gc, nil
	}
}

// sourcesOf are the keys a connection from a counts under: its address,
// and its subnet (an IPv6 address's /64; an IPv4 address's own).
func sourcesOf(a net.Addr) (src, subnet string) {
	return "address " + addrOf(a), "subnet " + subnetOf(a)
}

// release takes one place of each key from counts.
func release(counts map[string]int, keys ...string) {
	for _, k := range keys {
		if counts[k]--; counts[k] <= 0 {
			delete(counts, k)
		}
	}
}

// addrOf is a's IP as text (a's own text if it has none).
func addrOf(a net.Addr) string {
	if ip := hostOf(a); ip.IsValid() {
		return ip.String()
	}
	if a == nil {
		return "unknown"
	}
	return a.String()
}

// subnetOf is a's IPv4 address, or its IPv6 /64 (one host may hold a
// whole /64: joins are charged by it).
func subnetOf(a net.Addr) string {
	ip := hostOf(a)
	if !ip.IsValid() || ip.Is4() {
		return addrOf(a)
	}
	return netip.PrefixFrom(ip, 64).Masked().String()
}

// hostOf is a's IP (IPv4 unmapped, without a zone); invalid if a has none.
func hostOf(a net.Addr) netip.Addr {
	if a == nil {
		return netip.Addr{}
	}
	ap, err := netip.ParseAddrPort(a.String())
	if err != nil {
		return netip.Addr{}
	}
	return ap.Addr().Unmap().WithZone("")
}

// guardedConn gives its place back once, when it closes, and its place
// among its source's handshakes once its handshake ends (or it closes).
type guardedConn struct {
	net.Conn
	once      sync.Once
	release   func()
	shakeOnce sync.Once
	shaken    func()
	expiry    *time.Timer // an anonymous connection's lifetime
}

// handshakeOver gives back the connection's place among its source's
// handshakes.
func (c *guardedConn) handshakeOver() {
	if c.shaken != nil {
		c.shakeOnce.Do(c.shaken)
	}
}

// Close implements net.Conn.
func (c *guardedConn) Close() error {
	c.handshakeOver()
	c.once.Do(c.release)
	return c.Conn.Close()
}

// admit counts conn, whose handshake on raw is over with state cs,
// against its device's bound (by certificate) or, without one, among the
// anonymous connections; past the bound it is closed and refused.
func (g *ConnGuard) admit(raw, conn net.Conn, cs *tls.ConnectionState) (net.Conn, error) {
	name := ""
	if len(cs.PeerCertificates) > 0 {
		leaf := cs.PeerCertificates[0]
		if id, err := ca.IdentityOf(leaf); err == nil {
			// By certificate, not name alone: an old certificate of a
			// device's name (replaced, refused by the registry) holds
			// places of its own, never the device's.
			name = string(id.Role) + "/" + id.Name + "/" + ca.Fingerprint(leaf)
		}
	}
	if name == "" {
		return g.anonymousConn(raw, conn)
	}
	g.mu.Lock()
	if g.byDevice[name] >= g.perDevice {
		last := g.logged[name]
		now := time.Now()
		if now.Sub(last) > time.Minute {
			g.logged[name] = now
		}
		g.mu.Unlock()
		g.refused.WithLabelValues("device").Inc()
		if now.Sub(last) > time.Minute {
			g.log.Warn("a device holds too many connections: one more refused", "device", name, "bound", g.perDevice, "from", raw.RemoteAddr().String())
		}
		conn.Close()
		return nil, fmt.Errorf("%w: %s holds %d", ErrTooManyConnections, name, g.perDevice)
	}
	g.byDevice[name]++
	g.mu.Unlock()
	return &guardedConn{Conn: conn, release: func() {
		g.mu.Lock()
		if g.byDevice[name]--; g.byDevice[name] <= 0 {
			delete(g.byDevice, name)
		}
		g.mu.Unlock()
	}}, nil
}

// anonymousConn admits a connection without a certificate (one that
// verified none: a host joining with a token) to its own places, for
// AnonymousLifetime.
func (g *ConnGuard) anonymousConn(raw, conn net.Conn) (net.Conn, error) {
	src, subnet := sourcesOf(raw.RemoteAddr())
	g.mu.Lock()
	if g.anonymousAll >= MaxAnonymous || g.anonymous[src] >= MaxAnonymousPerSource || g.anonymous[subnet] >= MaxAnonymousPerSubnet {
		g.mu.Unlock()
		g.refused.WithLabelValues("anonymous").Inc()
		conn.Close()
		return nil, fmt.Errorf("%w: connections without a certificate from %s", ErrTooManyConnections, addrOf(raw.RemoteAddr()))
	}
	g.anonymousAll++
	g.anonymous[src]++
	g.anonymous[subnet]++
	g.mu.Unlock()
	out := &guardedConn{Conn: conn}
	// The lifetime's timer goes with the connection: one left to fire
	// would hold a closed connection's memory for the rest of the minute.
	out.expiry = time.AfterFunc(AnonymousLifetime, func() { out.Close() })
	out.release = func() {
		out.expiry.Stop()
		g.mu.Lock()
		g.anonymousAll--
		release(g.anonymous, src, subnet)
		g.mu.Unlock()
	}
	return out, nil
}
