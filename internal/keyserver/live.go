package keyserver

import (
	"bytes"
	"context"
	"errors"
	"net"
	"sync"
	"sync/atomic"

	"google.golang.org/grpc/credentials"
)

// Live holds the TLS credentials a process uses now, replaced when it
// reloads them (SIGHUP after enclave cert renew, or a new CA bundle):
// every TLS handshake after Set uses the new certificate and roots, and
// the client connections made with other credentials are closed, so that
// gRPC makes them again with the new ones (a key service that pins the
// renewed certificate refuses the old one; issue 32).
type Live struct {
	p     atomic.Pointer[Credentials]
	mu    sync.Mutex
	conns map[*liveConn]struct{} // client connections up, made with p
}

// liveConn is a client connection Live made, closed when the credentials
// change.
type liveConn struct {
	net.Conn
	live *Live
}

// Close implements net.Conn.
func (c *liveConn) Close() error {
	c.live.mu.Lock()
	delete(c.live.conns, c)
	c.live.mu.Unlock()
	return c.Conn.Close()
}

// NewLive starts with c.
func NewLive(c *Credentials) *Live {
	l := &Live{}
	l.p.Store(c)
	return l
}

// Get returns the credentials in use.
func (l *Live) Get() *Credentials { return l.p.Load() }

// Set replaces them; client connections made with others are closed.
func (l *Live) Set(c *Credentials) {
	l.mu.Lock()
	if sameCredentials(l.p.Load(), c) { // a reload that changed nothing
		l.mu.Unlock()
		return
	}
	l.p.Store(c)
	conns := l.conns
	l.conns = nil
	l.mu.Unlock()
	for lc := range conns {
		lc.Conn.Close()
	}
}

// sameCredentials reports whether a and b hold the same certificate chain
// and CA bundle.
func sameCredentials(a, b *Credentials) bool {
	if a == nil || b == nil || len(a.Cert.Certificate) != len(b.Cert.Certificate) {
		return false
	}
	for i := range a.Cert.Certificate {
		if !bytes.Equal(a.Cert.Certificate[i], b.Cert.Certificate[i]) {
			return false
		}
	}
	ar, br := a.Roots.Certs(), b.Roots.Certs()
	if len(ar) != len(br) {
		return false
	}
	for i := range ar {
		if !bytes.Equal(ar[i].Raw, br[i].Raw) {
			return false
		}
	}
	return true
}

// clientCreds are gRPC transport credentials that make each handshake
// with the credentials in use.
type clientCreds struct {
	live *Live
	name string
}

func (c clientCreds) current() credentials.TransportCredentials {
	return credentials.NewTLS(c.live.Get().ClientTLS(c.name))
}

// ClientHandshake implements credentials.TransportCredentials.
func (c clientCreds) ClientHandshake(ctx context.Context, authority string, conn net.Conn) (net.Conn, credentials.AuthInfo, error) {
	used := c.live.Get()
	nc, info, err := credentials.NewTLS(used.ClientTLS(c.name)).ClientHandshake(ctx, authority, conn)
	if err != nil {
		return nil, nil, err
	}
	lc, err := c.live.track(nc, used)
	if err != nil {
		return nil, nil, err
	}
	return lc, info, nil
}

// track makes nc, whose handshake used the credentials used, one of the
// connections a Set closes; one whose credentials were replaced during
// its handshake is closed now.
func (l *Live) track(nc net.Conn, used *Credentials) (net.Conn, error) {
	lc := &liveConn{Conn: nc, live: l}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.Get() != used { // replaced during the handshake: made again
		nc.Close()
		return nil, errors.New("keyserver: credentials replaced during the handshake")
	}
	if l.conns == nil {
		l.conns = map[*liveConn]struct{}{}
	}
	l.conns[lc] = struct{}{}
	return lc, nil
}

// ServerHandshake implements credentials.TransportCredentials (a client's
// credentials serve no one).
func (c clientCreds) ServerHandshake(conn net.Conn) (net.Conn, credentials.AuthInfo, error) {
	return c.current().ServerHandshake(conn)
}

// Info implements credentials.TransportCredentials.
func (c clientCreds) Info() credentials.ProtocolInfo { return c.current().Info() }

// Clone implements credentials.TransportCredentials.
func (c clientCreds) Clone() credentials.TransportCredentials { return c }

// OverrideServerName implements credentials.TransportCredentials (gRPC
// no longer calls it; the name is fixed at Dial).
func (c clientCreds) OverrideServerName(string) error { return nil }
