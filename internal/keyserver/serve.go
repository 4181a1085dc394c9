package keyserver

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/resolver"
	"google.golang.org/grpc/resolver/manual"

	"github.com/enclavekeys/enclave/internal/api"
)

// Server serves a Service on its listeners: gRPC, and beside it on the
// same port the watch transport (WatchProtocol), which the TLS handshake's
// ALPN picks. Server makes the handshakes itself so that both share them
// and the connection bounds (Config.Conns).
type Server struct {
	// GRPC is the gRPC server behind it, given the connections that
	// negotiated "h2" (or nothing).
	GRPC *grpc.Server
	svc  *Service
	tls  *tls.Config
	h2   *connQueue
	once sync.Once

	mu      sync.Mutex
	stopped bool
	lis     map[net.Listener]struct{}
	shaking map[net.Conn]struct{} // in their handshake
	watches map[net.Conn]net.Conn // serving a watch: its socket
	wg      sync.WaitGroup        // the connections' goroutines
}

// NewServer returns a Server for s over mutual TLS with creds.
func NewServer(s *Service, creds *Credentials, opts ...grpc.ServerOption) *Server {
	return NewServerLive(s, NewLive(creds), opts...)
}

// NewServerLive is NewServer whose handshakes take the credentials live
// holds at the time (a reload changes them).
func NewServerLive(s *Service, live *Live, opts ...grpc.ServerOption) *Server {
	// Memory per connection (issue 36: a key server holds one per agent):
	// no read buffer over TLS's own (32 KiB by default; the write buffer
	// is held only while writing).
	//
	// A connection without a call or stream open for GRPCIdle is closed
	// (gRPC's GOAWAY; the client connects again for its next call): an
	// agent watches over the watch transport and calls now and then (its
	// keys after a rotation, its directory entry every few minutes), so
	// that between calls it holds one connection here, not two.
	opts = append([]grpc.ServerOption{grpc.Creds(handshaken{}), grpc.ConnectionTimeout(HandshakeTimeout),
		grpc.MaxRecvMsgSize(MaxRequestBytes), grpc.ReadBufferSize(0),
		grpc.KeepaliveParams(keepalive.ServerParameters{MaxConnectionIdle: grpcIdle})}, opts...)
	gs := grpc.NewServer(opts...)
	api.RegisterKeyServiceServer(gs, s)
	api.RegisterAdminServer(gs, s)
	api.RegisterPairExchangeServer(gs, s)
	api.RegisterEnrollServer(gs, s)
	return &Server{GRPC: gs, svc: s, h2: newConnQueue(), lis: map[net.Listener]struct{}{},
		shaking: map[net.Conn]struct{}{}, watches: map[net.Conn]net.Conn{},
		tls: serverTLS(live)}
}

// serverTLS is the server's TLS configuration: each handshake takes the
// credentials live holds. The configuration of each is made once: every
// connection keeps the one its handshake used (a kilobyte each, issue 36).
func serverTLS(live *Live) *tls.Config {
	type made struct {
		creds *Credentials
		cfg   *tls.Config
	}
	var last atomic.Pointer[made]
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
			creds := live.Get()
			if m := last.Load(); m != nil && m.creds == creds {
				return m.cfg, nil
			}
			c := creds.ServerTLS()
			c.NextProtos = []string{WatchProtocol, "h2"}
			last.Store(&made{creds, c})
			return c, nil
		},
	}
}

// Serve accepts connections on l until it fails or the server stops (nil
// then, as gRPC's Serve).
func (srv *Server) Serve(l net.Listener) error {
	srv.mu.Lock()
	if srv.stopped {
		srv.mu.Unlock()
		l.Close()
		return grpc.ErrServerStopped
	}
	srv.lis[l] = struct{}{}
	srv.mu.Unlock()
	srv.once.Do(func() { go srv.GRPC.Serve(srv.h2) })
	var pause time.Duration
	var failures int     // accepts failed since the last warning
	var warned time.Time // when the last was
	for {
		c, err := l.Accept()
		if err != nil {
			srv.mu.Lock()
			stopped := srv.stopped
			srv.mu.Unlock()
			if stopped {
				return nil
			}
			if !passing(err) {
				return err
			}
			// Out of file descriptors or buffers, a connection reset in
			// the backlog: a moment's pause, never the end of the
			// service (every device would reconnect at once). Warned of
			// at most every 10 s, with how many failed.
			pause = min(max(2*pause, 5*time.Millisecond), time.Second)
			if failures++; time.Since(warned) >= 10*time.Second {
				srv.svc.log.Warn("accepting connections fails; pausing and trying again", "err", err, "failures", failures, "pause", pause)
				failures, warned = 0, time.Now()
			}
			time.Sleep(pause)
			continue
		}
		if pause > time.Second/2 {
			pause /= 2 // back to accepting at once only as failures stop
		} else {
			pause = 0
		}
		srv.mu.Lock()
		if srv.stopped {
			srv.mu.Unlock()
			c.Close()
			return nil
		}
		srv.shaking[c] = struct{}{}
		srv.wg.Add(1)
		srv.mu.Unlock()
		go srv.handle(c)
	}
}

// passing reports whether an accept error passes (the listener may give
// connections again): the process or system out of file descriptors or
// memory, a connection that went before it was accepted, a timeout.
func passing(err error) bool {
	for _, e := range []error{syscall.EMFILE, syscall.ENFILE, syscall.ENOBUFS, syscall.ENOMEM,
		syscall.ECONNABORTED, syscall.ECONNRESET, syscall.EPROTO, syscall.EPERM, syscall.EINTR, syscall.EAGAIN} {
		if errors.Is(err, e) {
			return true
		}
	}
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// handle makes c's TLS handshake, counts it against the bounds, and hands
// it to gRPC or serves its watch.
func (srv *Server) handle(raw net.Conn) {
	defer srv.wg.Done()
	tc := tls.Server(raw, srv.tls)
	raw.SetDeadline(time.Now().Add(HandshakeTimeout))
	err := tc.Handshake()
	if gc, ok := raw.(*guardedConn); ok {
		gc.handshakeOver()
	}
	srv.mu.Lock()
	delete(srv.shaking, raw)
	srv.mu.Unlock()
	if err != nil {
		tc.Close()
		return
	}
	raw.SetDeadline(time.Time{})
	cs := tc.ConnectionState()
	var conn net.Conn = tc
	if g := srv.svc.conns; g != nil {
		if conn, err = g.admit(raw, tc, &cs); err != nil {
			return // closed, counted and logged
		}
	}
	switch cs.NegotiatedProtocol {
	case "h2":
		if !srv.h2.push(&handshakenConn{Conn: conn, state: cs}) {
			conn.Close()
		}
		return
	case WatchProtocol:
	default: // no ALPN: gRPC's own TLS credentials refuse it too
		conn.Close()
		return
	}
	srv.mu.Lock()
	if srv.stopped {
		srv.mu.Unlock()
		conn.Close()
		return
	}
	srv.watches[conn] = raw
	srv.mu.Unlock()
	srv.serveWatch(conn, &cs)
	conn.Close()
	srv.mu.Lock()
	delete(srv.watches, conn)
	srv.mu.Unlock()
}

// stop closes the listeners and the connections in their handshake, and
// the watch connections too unless graceful (they end with the service).
// The sockets are closed, outside the lock: a TLS close would write an
// alert, which a client that does not read could hold up.
func (srv *Server) stop(graceful bool) {
	srv.mu.Lock()
	srv.stopped = true
	var raws []net.Conn
	for l := range srv.lis {
		l.Close()
	}
	for c := range srv.shaking {
		raws = append(raws, c)
	}
	if !graceful {
		for _, raw := range srv.watches {
			raws = append(raws, raw)
		}
	}
	srv.mu.Unlock()
	for _, c := range raws {
		closeSocket(c)
	}
}

// closeSocket closes the socket under c (a guardedConn's own Close runs
// when its user closes it, and gives its place back then).
func closeSocket(c net.Conn) {
	if gc, ok := c.(*guardedConn); ok {
		c = gc.Conn
	}
	c.Close()
}

// Stop closes every listener and connection at once.
func (srv *Server) Stop() {
	srv.stop(false)
	srv.GRPC.Stop()
	srv.wg.Wait()
}

// GracefulStop stops accepting, lets gRPC's calls finish and waits for
// the watch streams, which end when the Service stops.
func (srv *Server) GracefulStop() {
	srv.stop(true)
	srv.GRPC.GracefulStop()
	srv.wg.Wait()
}

// connQueue is the listener gRPC serves: the connections Server made the
// handshakes of.
type connQueue struct {
	ch   chan net.Conn
	done chan struct{}
	once sync.Once
}

func newConnQueue() *connQueue {
	return &connQueue{ch: make(chan net.Conn), done: make(chan struct{})}
}

// push hands c to gRPC; false once gRPC has stopped.
func (q *connQueue) push(c net.Conn) bool {
	select {
	case q.ch <- c:
		return true
	case <-q.done:
		return false
	}
}

// Accept implements net.Listener.
func (q *connQueue) Accept() (net.Conn, error) {
	select {
	case c := <-q.ch:
		return c, nil
	case <-q.done:
		return nil, net.ErrClosed
	}
}

// Close implements net.Listener.
func (q *connQueue) Close() error {
	q.once.Do(func() { close(q.done) })
	return nil
}

// Addr implements net.Listener.
func (q *connQueue) Addr() net.Addr { return queueAddr{} }

type queueAddr struct{}

func (queueAddr) Network() string { return "tls" }
func (queueAddr) String() string  { return "keyserver" }

// handshakenConn is a connection whose TLS handshake Server made.
type handshakenConn struct {
	net.Conn
	state tls.ConnectionState
}

// handshaken are gRPC's server credentials for connections Server made
// the handshakes of: they hand over the TLS state, nothing more.
type handshaken struct{}

// ServerHandshake implements credentials.TransportCredentials.
func (handshaken) ServerHandshake(c net.Conn) (net.Conn, credentials.AuthInfo, error) {
	h, ok := c.(*handshakenConn)
	if !ok {
		return nil, nil, errors.New("keyserver: a connection without the server's TLS handshake")
	}
	return h, credentials.TLSInfo{State: h.state, CommonAuthInfo: credentials.CommonAuthInfo{SecurityLevel: credentials.PrivacyAndIntegrity}}, nil
}

// ClientHandshake implements credentials.TransportCredentials (a
// server's credentials dial no one).
func (handshaken) ClientHandshake(context.Context, string, net.Conn) (net.Conn, credentials.AuthInfo, error) {
	return nil, nil, errors.New("keyserver: server credentials cannot dial")
}

// Info implements credentials.TransportCredentials.
func (handshaken) Info() credentials.ProtocolInfo {
	return credentials.ProtocolInfo{SecurityProtocol: "tls"}
}

// Clone implements credentials.TransportCredentials.
func (h handshaken) Clone() credentials.TransportCredentials { return h }

// OverrideServerName implements credentials.TransportCredentials.
func (handshaken) OverrideServerName(string) error { return nil }

// GRPCIdle is how long a key server keeps a gRPC connection without a
// call or stream (a device's own idles at half of it). A connection
// holds some 40 KiB on the key server: an agent that calls about every
// 10 minutes holds one for a few percent of the time, for a TLS
// handshake (about 1 ms of the key server's CPU) per call.
const GRPCIdle = 30 * time.Second

// grpcIdle is GRPCIdle as the code reads it (tests shorten it).
var grpcIdle = GRPCIdle

// clientKeepalive makes a device ping its key server over gRPC while a
// call or stream is open and the connection has been quiet 6 minutes
// (an old key server's watch stream: the watch transport pings itself).
// Not more often: gRPC servers refuse pings closer than 5 minutes by
// default, and a key server before this release has that default.
var clientKeepalive = grpc.WithKeepaliveParams(keepalive.ClientParameters{Time: 6 * time.Minute, Timeout: 20 * time.Second})

// Reconnect is how a device's connection to the key service tries again
// after losing it: within a few seconds (gRPC's default backoff grows to
// two minutes, which would leave a device without its key service long
// after the service is back).
var Reconnect = grpc.WithConnectParams(grpc.ConnectParams{MinConnectTimeout: 5 * time.Second,
	Backoff: backoff.Config{BaseDelay: 250 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: 3 * time.Second}})

// Dial connects to the key service at addr over mutual TLS. addr may name
// several replicas, separated by commas: the connection uses the first
// that answers and fails over to the others when it stops answering.
// serverName is the name (or IP) every replica's certificate must carry;
// empty means each replica's own host. opts are added to the connection's
// (the command line adds waiting for a key server that is still
// starting).
func Dial(addr, serverName string, creds *Credentials, opts ...grpc.DialOption) (*grpc.ClientConn, error) {
	return DialLive(addr, serverName, NewLive(creds), opts...)
}

// replicaAddrs are the replicas addr names, each with the name its
// certificate must carry.
func replicaAddrs(addr, serverName string) ([]resolver.Address, error) {
	var addrs []resolver.Address
	for _, a := range strings.Split(addr, ",") {
		a = strings.TrimSpace(a)
		host, _, err := net.SplitHostPort(a)
		if err != nil {
			return nil, err
		}
		ra := resolver.Address{Addr: a, ServerName: serverName}
		if serverName == "" {
			ra.ServerName = host
		}
		addrs = append(addrs, ra)
	}
	return addrs, nil
}

// DialLive is Dial whose handshakes take the credentials live holds at
// the time (a reload changes them).
func DialLive(addr, serverName string, live *Live, opts ...grpc.DialOption) (*grpc.ClientConn, error) {
	addrs, err := replicaAddrs(addr, serverName)
	if err != nil {
		return nil, err
	}
	opts = append([]grpc.DialOption{grpc.WithIdleTimeout(GRPCIdle / 2), clientKeepalive}, opts...)
	if len(addrs) == 1 {
		name := addrs[0].ServerName
		opts = append([]grpc.DialOption{grpc.WithTransportCredentials(clientCreds{live, name})}, opts...)
		return grpc.NewClient(addrs[0].Addr, opts...)
	}
	// Several replicas: a resolver of their addresses, each checked
	// against its own name (the TLS configuration takes the address's).
	r := manual.NewBuilderWithScheme("enclave-keyservice")
	r.InitialState(resolver.State{Addresses: addrs})
	opts = append([]grpc.DialOption{grpc.WithTransportCredentials(clientCreds{live, ""}), grpc.WithResolvers(r)}, opts...)
	return grpc.NewClient(r.Scheme()+":///keyservice", opts...)
}
