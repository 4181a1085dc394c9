package keyserver

import (
	"net"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/resolver"
	"google.golang.org/grpc/resolver/manual"

	"github.com/enclavekeys/enclave/internal/api"
)

// NewGRPCServer returns a gRPC server for s over mutual TLS with creds.
func NewGRPCServer(s *Service, creds *Credentials, opts ...grpc.ServerOption) *grpc.Server {
	return NewGRPCServerLive(s, NewLive(creds), opts...)
}

// NewGRPCServerLive is NewGRPCServer whose handshakes take the
// credentials live holds at the time (a reload changes them).
func NewGRPCServerLive(s *Service, live *Live, opts ...grpc.ServerOption) *grpc.Server {
	creds := []grpc.ServerOption{grpc.Creds(credentials.NewTLS(live.serverTLS()))}
	if s.conns != nil {
		creds = s.conns.ServerOptions(credentials.NewTLS(live.serverTLS()))
	}
	// Memory per connection (issue 36: a key server holds one per agent):
	// no read buffer over TLS's own (32 KiB by default; the write buffer
	// is held only while writing).
	opts = append(append(creds, grpc.MaxRecvMsgSize(MaxRequestBytes), grpc.ReadBufferSize(0)), opts...)
	gs := grpc.NewServer(opts...)
	api.RegisterKeyServiceServer(gs, s)
	api.RegisterAdminServer(gs, s)
	api.RegisterPairExchangeServer(gs, s)
	api.RegisterEnrollServer(gs, s)
	return gs
}

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

// DialLive is Dial whose handshakes take the credentials live holds at
// the time (a reload changes them).
func DialLive(addr, serverName string, live *Live, opts ...grpc.DialOption) (*grpc.ClientConn, error) {
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
