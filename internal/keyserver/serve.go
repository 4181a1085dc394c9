package keyserver

import (
	"net"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/enclavekeys/enclave/internal/api"
)

// NewGRPCServer returns a gRPC server for s over mutual TLS with creds.
func NewGRPCServer(s *Service, creds *Credentials, opts ...grpc.ServerOption) *grpc.Server {
	opts = append([]grpc.ServerOption{grpc.Creds(credentials.NewTLS(creds.ServerTLS())), grpc.MaxRecvMsgSize(MaxRequestBytes)}, opts...)
	gs := grpc.NewServer(opts...)
	api.RegisterKeyServiceServer(gs, s)
	api.RegisterAdminServer(gs, s)
	api.RegisterPairExchangeServer(gs, s)
	return gs
}

// Dial connects to a key server at addr over mutual TLS. serverName is the
// name (or IP) the server's certificate must carry; empty means the host of
// addr. opts are added to the connection's (the command line adds waiting
// for a key server that is still starting).
func Dial(addr, serverName string, creds *Credentials, opts ...grpc.DialOption) (*grpc.ClientConn, error) {
	if serverName == "" {
		host, _, err := net.SplitHostPort(addr)
		if err != nil {
			return nil, err
		}
		serverName = host
	}
	opts = append([]grpc.DialOption{grpc.WithTransportCredentials(credentials.NewTLS(creds.ClientTLS(serverName)))}, opts...)
	return grpc.NewClient(addr, opts...)
}
