package keyserver

import (
	"bytes"
	"context"
	"crypto/tls"
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

// serverTLS is the server's TLS configuration, each handshake taking the
// credentials in use.
func (l *Live) serverTLS() *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
			c := l.Get().ServerTLS()
			c.NextProtos = []string{"h2"} // gRPC's ALPN, which the credentials add to the outer one only
			return c, nil
		},
	}
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
	lc := &liveConn{Conn: nc, live: c.live}
	c.live.mu.Lock()
	defer c.live.mu.Unlock()
	if c.live.Get() != used { // replaced during the handshake: made again
		nc.Close()
		return nil, nil, errors.New("keyserver: credentials replaced during the handshake")
	}
	if c.live.conns == nil {
		c.live.conns = map[*liveConn]struct{}{}
	}
	c.live.conns[lc] = struct{}{}
	return lc, info, nil
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
