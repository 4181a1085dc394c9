package keyserver

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/url"
	"sync/atomic"
	"time"

	spb "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/resolver"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"golang.org/x/net/http/httpproxy"

	"github.com/enclavekeys/enclave/internal/api"
)

// WatchFallback is how long a client that met a key server without the
// watch transport (one built before it) watches over gRPC before it tries
// the transport again (the server may have been upgraded since).
const WatchFallback = 10 * time.Minute

// watchFallback is WatchFallback as the code reads it (tests shorten it).
var watchFallback = WatchFallback

// ErrNoWatchTransport: the key server answered "h2" only (it was built
// before the watch transport).
var ErrNoWatchTransport = errors.New("keyserver: the key server does not offer the watch transport")

// WithWatchTransport returns c whose WatchGenerations opens its stream
// over the watch transport (WatchProtocol) to the replicas addr names, as
// Dial does, with live's credentials; every other call goes through c.
// It watches through c's own gRPC stream instead, for WatchFallback (the
// stream then ends, and the next tries the transport again), when a key
// server does not offer the transport (one built before it) or when
// fallbackAfter handshakes in a row that offer it fail where one that
// offers gRPC alone, made at once to the same replica, passes (a
// middlebox that drops what it does not know; a key server that refuses
// or is overloaded fails both, and keeps its devices on the transport);
// and always when a proxy is set for the key service (HTTPS_PROXY:
// gRPC's connection goes through it, the transport does not). Each of
// these is logged, with its cause, to log (nil: not).
func WithWatchTransport(c api.KeyServiceClient, addr, serverName string, live *Live, log *slog.Logger) (api.KeyServiceClient, error) {
	addrs, err := replicaAddrs(addr, serverName)
	if err != nil {
		return nil, err
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	proxy := httpproxy.FromEnvironment().ProxyFunc()
	for _, a := range addrs {
		if u, err := proxy(&url.URL{Scheme: "https", Host: a.Addr}); err != nil || u != nil {
			log.Info("watching the key service over gRPC: a proxy is set for it (HTTPS_PROXY), which the watch transport does not take", "keyserver", a.Addr)
			return c, nil
		}
	}
	return &watchClient{KeyServiceClient: c, addrs: addrs, live: live, log: log}, nil
}

// fallbackAfter is how many handshakes in a row may fail on connections
// made before a client watches over gRPC for a while.
const fallbackAfter = 3

type watchClient struct {
	api.KeyServiceClient
	addrs     []resolver.Address
	live      *Live
	log       *slog.Logger
	next      atomic.Int64 // the replica tried first: the last that answered
	grpcUntil atomic.Int64 // Unix nanoseconds: until then, gRPC's stream
	failed    atomic.Int64 // handshakes failed in a row where gRPC's passed
}

// WatchGenerations implements api.KeyServiceClient.
func (w *watchClient) WatchGenerations(ctx context.Context, req *api.WatchGenerationsRequest, opts ...grpc.CallOption) (api.KeyService_WatchGenerationsClient, error) {
	if time.Now().UnixNano() < w.grpcUntil.Load() {
		return w.overGRPC(ctx, req, opts...)
	}
	var last error
	first := int(w.next.Load())
	for i := range w.addrs {
		n := (first + i) % len(w.addrs)
		s, err := openWatch(ctx, w.addrs[n], w.live, req)
		var he *handshakeError
		switch {
		case err == nil:
			w.failed.Store(0)
			w.next.Store(int64(n))
			return s, nil
		case ctx.Err() != nil:
			return nil, status.FromContextError(ctx.Err()).Err()
		case errors.Is(err, ErrNoWatchTransport):
			w.fallBack("the key server does not offer the watch transport (a release before it)", w.addrs[n].Addr, nil)
			return w.overGRPC(ctx, req, opts...)
		case errors.As(err, &he) && probeGRPC(ctx, w.addrs[n], w.live) == nil && w.failed.Add(1) >= fallbackAfter:
			w.failed.Store(0)
			w.fallBack(fmt.Sprintf("%d handshakes in a row offering the watch transport failed where one offering gRPC passed (a middlebox that drops its protocol? let enclave-watch/1 through)", fallbackAfter), w.addrs[n].Addr, err)
			return w.overGRPC(ctx, req, opts...)
		}
		last = err
	}
	return nil, status.Error(codes.Unavailable, last.Error())
}

// overGRPC opens the watch over gRPC, to end when the fallback does: a
// stream that lived on would keep the device off the transport for as
// long as it lasts (days).
func (w *watchClient) overGRPC(ctx context.Context, req *api.WatchGenerationsRequest, opts ...grpc.CallOption) (api.KeyService_WatchGenerationsClient, error) {
	until := time.Unix(0, w.grpcUntil.Load())
	sctx, cancel := context.WithDeadline(ctx, until)
	s, err := w.KeyServiceClient.WatchGenerations(sctx, req, opts...)
	if err != nil {
		cancel()
		return nil, err
	}
	return &fallbackStream{ServerStreamingClient: s, parent: ctx, cancel: cancel}, nil
}

// fallbackStream is a watch over gRPC that ends when its fallback does.
type fallbackStream struct {
	grpc.ServerStreamingClient[api.GenerationEvent]
	parent context.Context
	cancel context.CancelFunc
}

// Recv implements grpc.ServerStreamingClient.
func (f *fallbackStream) Recv() (*api.GenerationEvent, error) {
	ev, err := f.ServerStreamingClient.Recv()
	if err != nil {
		f.cancel()
		if f.parent.Err() == nil && status.Code(err) == codes.DeadlineExceeded {
			err = status.Errorf(codes.Unavailable, "watched over gRPC for %v: trying the watch transport again", watchFallback)
		}
	}
	return ev, err
}

// probeGRPC makes a TLS handshake offering gRPC alone to the replica at
// a: nil if it passes.
func probeGRPC(ctx context.Context, a resolver.Address, live *Live) error {
	ctx, cancel := context.WithTimeout(ctx, HandshakeTimeout)
	defer cancel()
	cfg := live.Get().ClientTLS(a.ServerName)
	cfg.NextProtos = []string{"h2"}
	c, err := (&tls.Dialer{Config: cfg}).DialContext(ctx, "tcp", a.Addr)
	if err != nil {
		return err
	}
	return c.Close()
}

// fallBack watches over gRPC for WatchFallback, and says why.
func (w *watchClient) fallBack(why, addr string, err error) {
	w.grpcUntil.Store(time.Now().Add(watchFallback).UnixNano())
	args := []any{"keyserver", addr, "why", why, "again_in", watchFallback.String()}
	if err != nil {
		args = append(args, "err", err)
	}
	w.log.Warn("watching the key service over gRPC, not the watch transport", args...)
}

// handshakeError: a TLS handshake offering the watch transport failed on
// a connection that was made.
type handshakeError struct {
	addr string
	err  error
}

func (e *handshakeError) Error() string { return fmt.Sprintf("keyserver %s: %v", e.addr, e.err) }
func (e *handshakeError) Unwrap() error { return e.err }

// OpenWatch opens a watch stream over the watch transport to the key
// server at addr, as creds, and sends req; ErrNoWatchTransport if the
// server does not offer it. serverName is the name its certificate must
// carry (empty: addr's host).
func OpenWatch(ctx context.Context, addr, serverName string, creds *Credentials, req *api.WatchGenerationsRequest) (api.KeyService_WatchGenerationsClient, error) {
	addrs, err := replicaAddrs(addr, serverName)
	if err != nil {
		return nil, err
	}
	if len(addrs) != 1 {
		return nil, fmt.Errorf("keyserver: OpenWatch takes one address, not %q", addr)
	}
	return openWatch(ctx, addrs[0], NewLive(creds), req)
}

// openWatch opens a watch stream to the replica at a and sends req.
func openWatch(ctx context.Context, a resolver.Address, live *Live, req *api.WatchGenerationsRequest) (*wireStream, error) {
	d := net.Dialer{Timeout: HandshakeTimeout, KeepAlive: WatchPingInterval}
	raw, err := d.DialContext(ctx, "tcp", a.Addr)
	if err != nil {
		return nil, err
	}
	used := live.Get()
	cfg := used.ClientTLS(a.ServerName)
	cfg.NextProtos = []string{WatchProtocol, "h2"}
	tc := tls.Client(raw, cfg)
	hctx, cancel := context.WithTimeout(ctx, HandshakeTimeout)
	err = tc.HandshakeContext(hctx)
	cancel()
	if err != nil {
		raw.Close()
		if ctx.Err() == nil {
			return nil, &handshakeError{a.Addr, err}
		}
		return nil, fmt.Errorf("keyserver %s: %w", a.Addr, err)
	}
	if tc.ConnectionState().NegotiatedProtocol != WatchProtocol {
		tc.Close()
		return nil, ErrNoWatchTransport
	}
	conn, err := live.track(tc, used)
	if err != nil {
		return nil, err
	}
	b, err := appendFrame(nil, frameRequest, req)
	if err == nil {
		conn.SetWriteDeadline(time.Now().Add(watchWriteTimeout))
		_, err = conn.Write(b)
	}
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("keyserver %s: %w", a.Addr, err)
	}
	s := &wireStream{ctx: ctx, conn: conn, addr: a.Addr}
	s.stop = context.AfterFunc(ctx, func() { conn.Close() })
	return s, nil
}

// wireStream is a watch stream over the watch transport, with the
// methods of gRPC's client stream.
type wireStream struct {
	ctx  context.Context
	conn net.Conn
	addr string
	stop func() bool
	buf  []byte
	err  error // the stream's end, once it ended
}

// Recv returns the next event, or the status the stream ended with (the
// gRPC stream's: io.EOF for OK).
func (s *wireStream) Recv() (*api.GenerationEvent, error) {
	for s.err == nil {
		if s.ctx.Err() != nil { // nothing more once the caller is done, buffered or not
			return nil, s.broken(s.ctx.Err())
		}
		s.conn.SetReadDeadline(time.Now().Add(watchSilence))
		kind, payload, err := readFrame(s.conn, s.buf, maxFramePayload)
		if err != nil {
			return nil, s.broken(err)
		}
		s.buf = payload // its memory, for the next (Unmarshal copies)
		switch kind {
		case framePing:
		case frameEvent:
			ev := new(api.GenerationEvent)
			if err := proto.Unmarshal(payload, ev); err != nil {
				return nil, s.broken(fmt.Errorf("%w: an event: %v", ErrWatchFrame, err))
			}
			return ev, nil
		case frameEnd:
			var sp spb.Status
			if err := proto.Unmarshal(payload, &sp); err != nil {
				return nil, s.broken(fmt.Errorf("%w: the end: %v", ErrWatchFrame, err))
			}
			end := status.FromProto(&sp).Err()
			if end == nil {
				end = io.EOF
			}
			s.finish(end)
		default:
			return nil, s.broken(fmt.Errorf("%w: kind %d from the server", ErrWatchFrame, kind))
		}
	}
	return nil, s.err
}

// broken ends the stream for err: a transport failure, or the caller's
// context ended.
func (s *wireStream) broken(err error) error {
	var ne net.Error
	switch {
	case s.ctx.Err() != nil:
		err = status.FromContextError(s.ctx.Err()).Err()
	case errors.As(err, &ne) && ne.Timeout():
		err = status.Errorf(codes.Unavailable, "keyserver %s: nothing heard for %v on the watch stream", s.addr, watchSilence)
	case errors.Is(err, io.EOF):
		err = status.Errorf(codes.Unavailable, "keyserver %s: the watch stream closed without an end", s.addr)
	default:
		err = status.Errorf(codes.Unavailable, "keyserver %s: watch stream: %v", s.addr, err)
	}
	s.finish(err)
	return err
}

func (s *wireStream) finish(err error) {
	s.err = err
	s.stop()
	s.conn.Close()
	s.buf = nil
}

// Header implements grpc.ClientStream (the transport has no metadata).
func (s *wireStream) Header() (metadata.MD, error) { return metadata.MD{}, nil }

// Trailer implements grpc.ClientStream.
func (s *wireStream) Trailer() metadata.MD { return metadata.MD{} }

// CloseSend implements grpc.ClientStream (the request was all it sends).
func (s *wireStream) CloseSend() error { return nil }

// Context implements grpc.ClientStream.
func (s *wireStream) Context() context.Context { return s.ctx }

// SendMsg implements grpc.ClientStream: a watch sends its request only.
func (s *wireStream) SendMsg(any) error {
	return status.Error(codes.Internal, "a watch stream sends nothing after its request")
}

// RecvMsg implements grpc.ClientStream.
func (s *wireStream) RecvMsg(m any) error {
	ev, ok := m.(*api.GenerationEvent)
	if !ok {
		return status.Errorf(codes.Internal, "a watch stream receives GenerationEvents, not %T", m)
	}
	got, err := s.Recv()
	if err != nil {
		return err
	}
	proto.Reset(ev)
	proto.Merge(ev, got)
	return nil
}
