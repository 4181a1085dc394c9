package keyserver

import (
	"context"
	"crypto/tls"
	"net"
	"sync/atomic"

	"google.golang.org/grpc/credentials"
)

// Live holds the TLS credentials a process uses now, replaced when it
// reloads them (SIGHUP after enclave cert renew, or a new CA bundle):
// every TLS handshake after Set uses the new certificate and roots;
// connections already up keep theirs until they are made again.
type Live struct{ p atomic.Pointer[Credentials] }

// NewLive starts with c.
func NewLive(c *Credentials) *Live {
	l := &Live{}
	l.p.Store(c)
	return l
}

// Get returns the credentials in use.
func (l *Live) Get() *Credentials { return l.p.Load() }

// Set replaces them.
func (l *Live) Set(c *Credentials) { l.p.Store(c) }

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
	return c.current().ClientHandshake(ctx, authority, conn)
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
