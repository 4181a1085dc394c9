package keyserver

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"os"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/enclavekeys/enclave/internal/api"
	"github.com/enclavekeys/enclave/internal/ca"
)

// TestConnectionBounds: a device past its bound of connections is refused
// (its others go on), a connection past the replica's bound is closed at
// once, both counted; a place given back is taken again.
func TestConnectionBounds(t *testing.T) {
	g := NewConnGuard(4, 2, nil, nil)
	l := newLabWith(t, func(c *Config, _ *ca.Authority) { c.Conns = g })
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	admin := l.creds(ca.Identity{Name: "alice", Role: ca.RoleAdmin})
	call := func(c *Credentials) (codes.Code, func()) {
		conn, err := Dial(l.addr, "127.0.0.1", c)
		if err != nil {
			t.Fatal(err)
		}
		_, err = api.NewAdminClient(conn).Layout(ctx, &api.LayoutRequest{})
		return status.Code(err), func() { conn.Close() }
	}
	var closers []func()
	defer func() {
		for _, c := range closers {
			c()
		}
	}()
	for i := range 2 {
		code, closeIt := call(admin)
		closers = append(closers, closeIt)
		if code != codes.OK {
			t.Fatalf("alice's connection %d: %v", i+1, code)
		}
	}
	code, closeIt := call(admin)
	closeIt()
	if code != codes.Unavailable {
		t.Fatalf("alice's third connection: %v, want Unavailable", code)
	}
	if n := testutil.ToFloat64(g.refused.WithLabelValues("device")); n < 1 {
		t.Fatalf("device refusals counted: %v", n)
	}
	// Another admin takes the replica's last two places; one more is
	// closed before its handshake.
	bob := l.creds(ca.Identity{Name: "bob", Role: ca.RoleAdmin})
	for range 2 {
		code, closeIt := call(bob)
		closers = append(closers, closeIt)
		if code != codes.OK {
			t.Fatalf("bob: %v", code)
		}
	}
	carol := l.creds(ca.Identity{Name: "carol", Role: ca.RoleAdmin})
	code, closeIt = call(carol)
	closeIt()
	if code != codes.Unavailable || g.Open() != 4 {
		t.Fatalf("past the replica's bound: %v with %d open", code, g.Open())
	}
	if n := testutil.ToFloat64(g.refused.WithLabelValues("replica")); n < 1 {
		t.Fatalf("replica refusals counted: %v", n)
	}
	// One of alice's goes: carol gets its place.
	closers[0]()
	closers = closers[1:]
	deadline := time.Now().Add(5 * time.Second)
	for g.Open() > 3 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	code, closeIt = call(carol)
	closers = append(closers, closeIt)
	if code != codes.OK {
		t.Fatalf("carol after a place was given back: %v", code)
	}
}

// TestHandshakesPerSource: one address holds at most
// MaxHandshakesPerSource connections that have not finished their
// handshake (one more is closed at once, counted); the address's places
// come back as its connections go.
func TestHandshakesPerSource(t *testing.T) {
	g := NewConnGuard(1000, 4, nil, nil)
	l := newLabWith(t, func(c *Config, _ *ca.Authority) { c.Conns = g })
	var idle []net.Conn
	defer func() {
		for _, c := range idle {
			c.Close()
		}
	}()
	for range MaxHandshakesPerSource {
		c, err := net.Dial("tcp", l.addr)
		if err != nil {
			t.Fatal(err)
		}
		idle = append(idle, c)
	}
	waitFor(t, func() bool { return g.Open() == MaxHandshakesPerSource })
	extra, err := net.Dial("tcp", l.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer extra.Close()
	extra.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := extra.Read(make([]byte, 1)); err == nil {
		t.Fatal("a connection past the source's bound was kept")
	}
	if n := testutil.ToFloat64(g.refused.WithLabelValues("source")); n != 1 {
		t.Fatalf("source refusals: %v", n)
	}
	for _, c := range idle {
		c.Close()
	}
	idle = nil
	waitFor(t, func() bool { return g.Open() == 0 })
	adminServed(t, l, "after the idle connections went")
}

// adminServed checks that an admin with a certificate is answered.
func adminServed(t *testing.T, l *lab, when string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := Dial(l.addr, "127.0.0.1", l.creds(ca.Identity{Name: "alice", Role: ca.RoleAdmin}))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := api.NewAdminClient(conn).Layout(ctx, &api.LayoutRequest{}); err != nil {
		t.Fatalf("%s: %v", when, err)
	}
}

// TestAnonymousConnections: connections without a client certificate (a
// host joining) have places of their own: MaxAnonymousPerSource from one
// address, one more closed after its handshake and counted, never the
// places of hosts with certificates.
func TestAnonymousConnections(t *testing.T) {
	g := NewConnGuard(1000, 4, nil, nil)
	l := newLabWith(t, func(c *Config, _ *ca.Authority) { c.Conns = g })
	cfg := l.creds(ca.Identity{Name: "x", Role: ca.RoleClient}).ClientTLS("127.0.0.1")
	cfg.Certificates, cfg.NextProtos = nil, []string{"h2"}
	var held []*tls.Conn
	defer func() {
		for _, c := range held {
			c.Close()
		}
	}()
	for i := range MaxAnonymousPerSource {
		c, err := tls.Dial("tcp", l.addr, cfg)
		if err != nil {
			t.Fatalf("anonymous %d: %v", i, err)
		}
		held = append(held, c)
	}
	waitFor(t, func() bool {
		return testutil.ToFloat64(g.refused.WithLabelValues("anonymous")) == 0 && g.Open() == MaxAnonymousPerSource
	})
	c, err := tls.Dial("tcp", l.addr, cfg)
	if err == nil {
		defer c.Close()
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err = c.Read(make([]byte, 64))
		for err == nil { // the server's preface, then its close
			_, err = c.Read(make([]byte, 64))
		}
	}
	waitFor(t, func() bool { return testutil.ToFloat64(g.refused.WithLabelValues("anonymous")) == 1 })
	// A host with a certificate is served all the same.
	adminServed(t, l, "beside the anonymous connections")
}

// TestIdleGRPCConnectionsClose: a gRPC connection without a call or stream
// is closed after grpcIdle (an agent that watches over the watch
// transport then holds one connection, not two), and the client's next
// call connects again; one with a gRPC watch stream open stays.
func TestIdleGRPCConnectionsClose(t *testing.T) {
	d := grpcIdle
	t.Cleanup(func() { grpcIdle = d }) // after the lab's
	grpcIdle = 200 * time.Millisecond
	g := NewConnGuard(100, 8, nil, nil)
	l := newLabWith(t, func(c *Config, _ *ca.Authority) { c.Conns = g })
	setup(t, l)
	waitFor(t, func() bool { return g.Open() == 0 }) // the admin's, idle
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	srv := l.client(idServer)
	if _, err := srv.GetServerKeys(ctx, &api.GetServerKeysRequest{}); err != nil {
		t.Fatal(err)
	}
	if g.Open() != 1 {
		t.Fatalf("%d connections open after a call, want 1", g.Open())
	}
	waitFor(t, func() bool { return g.Open() == 0 })
	if _, err := srv.GetServerKeys(ctx, &api.GetServerKeysRequest{}); err != nil {
		t.Fatalf("a call after the connection idled out: %v", err)
	}
	stream, err := srv.WatchGenerations(ctx, &api.WatchGenerationsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	snapshotDone(t, stream)
	time.Sleep(5 * grpcIdle)
	if g.Open() != 1 {
		t.Fatalf("%d connections open with a gRPC watch stream, want 1", g.Open())
	}
	if _, err := srv.GetServerKeys(ctx, &api.GetServerKeysRequest{}); err != nil {
		t.Fatal(err)
	}
}

// TestSourcesOf: the per-source bounds count an address, and an IPv6
// address's /64 besides (a host may hold all of one; many hosts may share
// one).
func TestSourcesOf(t *testing.T) {
	for _, c := range []struct {
		addr        net.Addr
		src, subnet string
	}{
		{&net.TCPAddr{IP: net.ParseIP("192.0.2.7"), Port: 9}, "192.0.2.7", "192.0.2.7"},
		{&net.TCPAddr{IP: net.ParseIP("::ffff:192.0.2.7"), Port: 9}, "192.0.2.7", "192.0.2.7"},
		{&net.TCPAddr{IP: net.ParseIP("2001:db8:1:2:3:4:5:6"), Port: 9}, "2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"},
		{&net.TCPAddr{IP: net.ParseIP("2001:db8:1:2:ffff::1"), Port: 9, Zone: "eth0"}, "2001:db8:1:2:ffff::1", "2001:db8:1:2::/64"},
		{&net.UnixAddr{Name: "/run/x", Net: "unix"}, "/run/x", "/run/x"},
		{nil, "unknown", "unknown"},
	} {
		src, subnet := sourcesOf(c.addr)
		if src != "address "+c.src || subnet != "subnet "+c.subnet {
			t.Errorf("sourcesOf(%v) = %q, %q, want %q, %q", c.addr, src, subnet, c.src, c.subnet)
		}
	}
}

// TestAnonymousExpiryStops: an anonymous connection's lifetime timer stops
// when it closes (left to fire, it would hold the closed connection's
// memory for the rest of the minute, however many came and went).
func TestAnonymousExpiryStops(t *testing.T) {
	g := NewConnGuard(10, 2, nil, nil)
	a, b := net.Pipe()
	defer b.Close()
	c, err := g.anonymousConn(a, a)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	if c.(*guardedConn).expiry.Stop() {
		t.Fatal("the lifetime timer was still running after the close")
	}
	if g.anonymousAll != 0 {
		t.Fatalf("%d anonymous places held after the close", g.anonymousAll)
	}
}

// failingListener fails its first accepts as a process out of file
// descriptors does, then gives its connections.
type failingListener struct {
	net.Listener
	fails atomic.Int32
	errno syscall.Errno // EMFILE unless set
}

func (l *failingListener) Accept() (net.Conn, error) {
	if l.fails.Add(-1) >= 0 {
		errno := l.errno
		if errno == 0 {
			errno = syscall.EMFILE
		}
		return nil, &net.OpError{Op: "accept", Net: "tcp", Err: os.NewSyscallError("accept4", errno)}
	}
	return l.Listener.Accept()
}

// TestServeOutlivesAcceptErrors: running out of file descriptors pauses
// accepting; it does not end the service (whose end would send every
// device to reconnect at once).
func TestServeOutlivesAcceptErrors(t *testing.T) {
	l := newLab(t)
	setup(t, l)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	fl := &failingListener{Listener: lis}
	fl.fails.Store(5)
	srv := NewServer(l.svc, l.creds(ca.Identity{Name: "ks", Role: ca.RoleKeyserver}, "127.0.0.1"))
	served := make(chan error, 1)
	go func() { served <- srv.Serve(fl) }()
	defer srv.Stop()
	conn, err := Dial(lis.Addr().String(), "127.0.0.1", l.creds(idServer))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := api.NewKeyServiceClient(conn).GetServerKeys(ctx, &api.GetServerKeysRequest{}, grpc.WaitForReady(true)); err != nil {
		t.Fatalf("a call after the accept errors: %v", err)
	}
	select {
	case err := <-served:
		t.Fatalf("Serve returned %v", err)
	default:
	}
	srv.Stop()
	if err := <-served; err != nil {
		t.Fatalf("Serve after Stop: %v", err)
	}
}

// addrConn is a connection from a chosen address.
type addrConn struct {
	net.Conn
	from net.Addr
}

func (c addrConn) RemoteAddr() net.Addr { return c.from }

// fromListener accepts connections from the addresses it is given.
type fromListener struct {
	net.Listener
	from chan net.Addr
}

func (l fromListener) Accept() (net.Conn, error) {
	a, ok := <-l.from
	if !ok {
		return nil, net.ErrClosed
	}
	c, _ := net.Pipe()
	return addrConn{c, a}, nil
}

// TestHandshakesPerSubnet: one address of an IPv6 /64 holding its 64
// handshakes leaves the others of its /64 their places; the /64 as a
// whole is bounded too.
func TestHandshakesPerSubnet(t *testing.T) {
	g := NewConnGuard(10_000, 4, nil, nil)
	from := make(chan net.Addr, 2)
	l := g.Listener(fromListener{from: from})
	// accept offers a connection from ip, then one from an address that
	// is always let in: which of them Accept returns says whether ip's
	// was.
	sentinel := &net.TCPAddr{IP: net.ParseIP("192.0.2.200"), Port: 1}
	accept := func(ip string) bool {
		from <- &net.TCPAddr{IP: net.ParseIP(ip), Port: 1}
		from <- sentinel
		c, err := l.Accept()
		if err != nil {
			t.Fatal(err)
		}
		if c.RemoteAddr() == sentinel {
			c.Close()
			return false
		}
		s, err := l.Accept()
		if err != nil || s.RemoteAddr() != sentinel {
			t.Fatalf("the sentinel: %v %v", s, err)
		}
		s.Close()
		return true
	}
	for i := range MaxHandshakesPerSource {
		if !accept("2001:db8::1") {
			t.Fatalf("handshake %d of one address refused", i+1)
		}
	}
	if accept("2001:db8::1") {
		t.Fatal("one address past its bound accepted")
	}
	if !accept("2001:db8::2") {
		t.Fatal("another address of the /64 refused because of one of its neighbours")
	}
	for i := 2; i <= MaxHandshakesPerSubnet-MaxHandshakesPerSource; i++ { // the /64 filled: 64 + 1 + 959
		if !accept(fmt.Sprintf("2001:db8::%x", i+1)) {
			t.Fatalf("handshake %d of the /64 refused", MaxHandshakesPerSource+i)
		}
	}
	if accept("2001:db8::ffff") {
		t.Fatal("a /64 past its bound accepted")
	}
	if !accept("2001:db8:0:1::1") {
		t.Fatal("another /64 refused")
	}
	if n := testutil.ToFloat64(g.refused.WithLabelValues("source")); n != 2 {
		t.Fatalf("%v refusals counted, want 2", n)
	}
}

// TestServeEndsOnBrokenListener: an accept error that no pause mends (a
// listener shut down under the server) ends Serve with it.
func TestServeEndsOnBrokenListener(t *testing.T) {
	l := newLab(t)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer lis.Close()
	fl := &failingListener{Listener: lis, errno: syscall.EINVAL}
	fl.fails.Store(1)
	srv := NewServer(l.svc, l.creds(ca.Identity{Name: "ks", Role: ca.RoleKeyserver}, "127.0.0.1"))
	defer srv.Stop()
	if err := srv.Serve(fl); !errors.Is(err, syscall.EINVAL) {
		t.Fatalf("Serve on a broken listener: %v", err)
	}
}
