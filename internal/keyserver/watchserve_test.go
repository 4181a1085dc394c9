package keyserver

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"
	"weak"

	spb "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/enclavekeys/enclave/internal/api"
	"github.com/enclavekeys/enclave/internal/ca"
)

// rawWatch makes a TLS connection to the lab offering the watch transport
// only, as c (nil: without a certificate).
func rawWatch(t *testing.T, l *lab, c *Credentials) *tls.Conn {
	t.Helper()
	var cfg *tls.Config
	if c != nil {
		cfg = c.ClientTLS("127.0.0.1")
	} else {
		cfg = l.creds(idServer).ClientTLS("127.0.0.1")
		cfg.Certificates = nil
	}
	cfg.NextProtos = []string{WatchProtocol}
	conn, err := tls.Dial("tcp", l.addr, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if p := conn.ConnectionState().NegotiatedProtocol; p != WatchProtocol {
		t.Fatalf("negotiated %q, want %q", p, WatchProtocol)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// endOf reads frames until the end frame and returns its status (an
// error if the connection closed without one).
func endOf(t *testing.T, conn net.Conn) (*status.Status, error) {
	t.Helper()
	conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	var buf []byte
	for {
		kind, payload, err := readFrame(conn, buf, maxFramePayload)
		buf = payload
		if err != nil {
			return nil, err
		}
		if kind == frameEnd {
			var sp spb.Status
			if err := proto.Unmarshal(payload, &sp); err != nil {
				t.Fatal(err)
			}
			return status.FromProto(&sp), nil
		}
	}
}

// snapshotDone reads a stream's events up to the end of its snapshot.
func snapshotDone(t *testing.T, s api.KeyService_WatchGenerationsClient) {
	t.Helper()
	for {
		ev, err := s.Recv()
		if err != nil {
			t.Fatal(err)
		}
		if ev.Kind == api.GenerationEvent_SNAPSHOT_DONE {
			return
		}
	}
}

func frame(t *testing.T, kind byte, m proto.Message) []byte {
	t.Helper()
	b, err := appendFrame(nil, kind, m)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestWatchTransportUsed: a lab client watches over the transport, not
// gRPC (the tests that run over eachTransport would pass on a fallback).
func TestWatchTransportUsed(t *testing.T) {
	l := newLab(t)
	l.lean = true
	setup(t, l)
	stream, err := l.client(idServer).WatchGenerations(context.Background(), &api.WatchGenerationsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := stream.(*wireStream); !ok {
		t.Fatalf("the stream is a %T, not the watch transport's", stream)
	}
	if ev, err := stream.Recv(); err != nil || ev.Kind != api.GenerationEvent_SNAPSHOT {
		t.Fatalf("first event %+v, %v", ev, err)
	}
}

// TestWatchTransportFallback: a key server that offers only gRPC (one
// built before the transport) is watched over gRPC, and the client does
// not try the transport again for a while.
func TestWatchTransportFallback(t *testing.T) {
	l := newLab(t)
	setup(t, l)
	cfg := l.creds(ca.Identity{Name: "ks", Role: ca.RoleKeyserver}, "127.0.0.1").ServerTLS()
	cfg.NextProtos = []string{"h2"}
	old := grpc.NewServer(grpc.Creds(credentials.NewTLS(cfg)))
	api.RegisterKeyServiceServer(old, l.svc)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go old.Serve(lis)
	t.Cleanup(old.Stop)
	c := l.creds(idServer)
	conn, err := Dial(lis.Addr().String(), "127.0.0.1", c)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	kc, err := WithWatchTransport(api.NewKeyServiceClient(conn), lis.Addr().String(), "127.0.0.1", NewLive(c), nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	stream, err := kc.WatchGenerations(ctx, &api.WatchGenerationsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := stream.(*wireStream); ok {
		t.Fatal("a server without the transport was watched over it")
	}
	if ev, err := stream.Recv(); err != nil || ev.Kind != api.GenerationEvent_SNAPSHOT {
		t.Fatalf("first event over gRPC %+v, %v", ev, err)
	}
	if until := kc.(*watchClient).grpcUntil.Load(); time.Until(time.Unix(0, until)) < WatchFallback-time.Minute {
		t.Fatal("the fallback is not remembered")
	}
	if _, err := OpenWatch(ctx, lis.Addr().String(), "127.0.0.1", c, &api.WatchGenerationsRequest{}); !errors.Is(err, ErrNoWatchTransport) {
		t.Fatalf("OpenWatch on a server without the transport: %v", err)
	}
}

// TestWatchTransportHostile: a client holding a device's certificate sends
// what it likes. Each malformed or unauthorised stream ends with a clear
// status (or, for bytes that are no frame, a closed connection) and no
// place held; the key server serves the next watcher as before.
func TestWatchTransportHostile(t *testing.T) {
	l := newLab(t)
	setup(t, l)
	server := l.creds(idServer)
	big := []byte{frameRequest, 0xff, 0xff, 0xff}
	cases := []struct {
		name  string
		creds *Credentials
		send  []byte
		code  codes.Code // codes.OK: closed without an end
		says  string
	}{
		{"unknown kind", server, []byte{9, 0, 0, 0}, codes.OK, ""},
		{"a length past the bound", server, big, codes.OK, ""},
		{"a request past its bound", server, []byte{frameRequest, 0, 4, 1}, codes.OK, ""},
		{"a truncated frame", server, []byte{frameRequest, 0, 0, 8, 1}, codes.OK, ""},
		{"an event first", server, frame(t, frameEvent, &api.GenerationEvent{Kind: api.GenerationEvent_SNAPSHOT}), codes.InvalidArgument, "request frame first"},
		{"a request that does not parse", server, []byte{frameRequest, 0, 0, 2, 0xff, 0xff}, codes.InvalidArgument, "malformed watch request"},
		{"no certificate", nil, frame(t, frameRequest, &api.WatchGenerationsRequest{}), codes.Unauthenticated, "device certificate"},
		{"no certificate, nothing sent", nil, nil, codes.Unauthenticated, "device certificate"},
		{"an admin", l.creds(idAdmin), frame(t, frameRequest, &api.WatchGenerationsRequest{}), codes.PermissionDenied, "for devices"},
		{"a device not in the registry", l.creds(ca.Identity{Name: "nobody", Role: ca.RoleServer, Enclave: 3, ServerID: 77, HasServerID: true}), frame(t, frameRequest, &api.WatchGenerationsRequest{}), codes.PermissionDenied, "nobody"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			conn := rawWatch(t, l, c.creds)
			if c.name == "a truncated frame" {
				conn.Write(c.send)
				conn.CloseWrite()
			} else if _, err := conn.Write(c.send); err != nil {
				t.Fatal(err)
			}
			st, err := endOf(t, conn)
			switch {
			case c.code == codes.OK && err == nil:
				t.Fatalf("answered %v, want the connection closed", st)
			case c.code == codes.OK:
				if ne, ok := err.(net.Error); ok && ne.Timeout() {
					t.Fatal("the connection stayed open")
				}
			case err != nil:
				t.Fatalf("closed without an end (%v), want %v", err, c.code)
			case st.Code() != c.code || !strings.Contains(st.Message(), c.says):
				t.Fatalf("ended with %v, want %v saying %q", st, c.code, c.says)
			}
		})
	}
	// A client that offers no protocol at all is closed, as gRPC's own
	// TLS credentials do.
	cfg := server.ClientTLS("127.0.0.1")
	if plain, err := tls.Dial("tcp", l.addr, cfg); err == nil {
		plain.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := plain.Read(make([]byte, 1)); err == nil || errors.As(err, new(net.Error)) && err.(net.Error).Timeout() {
			t.Fatalf("a connection without ALPN: %v, want it closed", err)
		}
		plain.Close()
	}
	waitFor(t, func() bool { return l.svc.hub.watchers() == 0 })
	// A client that sends after its request breaks the protocol: its
	// stream ends and its place goes.
	conn := rawWatch(t, l, server)
	conn.Write(frame(t, frameRequest, &api.WatchGenerationsRequest{}))
	waitFor(t, func() bool { return l.svc.hub.watchers() == 1 })
	conn.Write([]byte("more"))
	waitFor(t, func() bool { return l.svc.hub.watchers() == 0 })
	// And the next watcher is served.
	s, err := OpenWatch(context.Background(), l.addr, "127.0.0.1", server, &api.WatchGenerationsRequest{})
	if err == nil {
		_, err = s.Recv()
	}
	if err != nil {
		t.Fatalf("a watcher after the hostile ones: %v", err)
	}
}

// TestWatchTransportRequestTimeout: a connection that never sends its
// request is closed after watchRequestTimeout.
func TestWatchTransportRequestTimeout(t *testing.T) {
	d := watchRequestTimeout
	t.Cleanup(func() { watchRequestTimeout = d }) // after the lab's: its streams read it
	watchRequestTimeout = 100 * time.Millisecond
	l := newLab(t)
	setup(t, l)
	conn := rawWatch(t, l, l.creds(idServer))
	if _, err := endOf(t, conn); err == nil || errors.As(err, new(net.Error)) && err.(net.Error).Timeout() {
		t.Fatalf("a silent client's connection: %v, want it closed", err)
	}
}

// TestWatchTransportLeaves: a watcher that goes gives its place back at
// once (its device's bound counts places).
func TestWatchTransportLeaves(t *testing.T) {
	l := newLab(t)
	setup(t, l)
	ctx, cancel := context.WithCancel(context.Background())
	s, err := OpenWatch(ctx, l.addr, "127.0.0.1", l.creds(idServer), &api.WatchGenerationsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Recv(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { return l.svc.hub.watchers() == 1 })
	cancel()
	if _, err := s.Recv(); status.Code(err) != codes.Canceled {
		t.Fatalf("Recv after its context ended: %v", err)
	}
	waitFor(t, func() bool { return l.svc.hub.watchers() == 0 })
}

// TestWatchTransportStop: when the service stops, its streams end with
// Unavailable (the device reconnects, to another replica or this one
// restarted), as gRPC's do.
func TestWatchTransportStop(t *testing.T) {
	l := newLab(t)
	setup(t, l)
	s, err := OpenWatch(context.Background(), l.addr, "127.0.0.1", l.creds(idServer), &api.WatchGenerationsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	snapshotDone(t, s)
	l.cancel()
	_, err = s.Recv()
	if status.Code(err) != codes.Unavailable || !strings.Contains(status.Convert(err).Message(), "stopping") {
		t.Fatalf("the stream as the service stops: %v", err)
	}
}

// TestWatchTransportPings: an idle stream is pinged, so that it outlives
// the client's silence bound; a key server that says nothing is taken for
// gone.
func TestWatchTransportPings(t *testing.T) {
	p, q := watchPing, watchSilence
	t.Cleanup(func() { watchPing, watchSilence = p, q }) // after the lab's: its streams read them
	watchPing, watchSilence = 20*time.Millisecond, 200*time.Millisecond
	l := newLab(t)
	admin := setup(t, l)
	ctx := context.Background()
	s, err := OpenWatch(ctx, l.addr, "127.0.0.1", l.creds(idGateway), &api.WatchGenerationsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	snapshotDone(t, s)
	got := make(chan error, 1)
	go func() {
		ev, err := s.Recv()
		if err == nil && ev.Kind != api.GenerationEvent_ROTATED {
			err = errors.New("not a rotation: " + ev.String())
		}
		got <- err
	}()
	time.Sleep(5 * watchSilence) // idle, but pinged
	if _, err := admin.Rotate(ctx, &api.RotateRequest{Pair: &api.Pair{A: 3, B: 7}, Now: true}); err != nil {
		t.Fatal(err)
	}
	if err := <-got; err != nil {
		t.Fatalf("after an idle while: %v", err)
	}

	// A server that negotiates the transport and then says nothing.
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer lis.Close()
	cfg := l.creds(ca.Identity{Name: "ks", Role: ca.RoleKeyserver}, "127.0.0.1").ServerTLS()
	cfg.NextProtos = []string{WatchProtocol}
	go func() {
		c, err := lis.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		tc := tls.Server(c, cfg)
		tc.Handshake()
		io.Copy(io.Discard, tc)
	}()
	s, err = OpenWatch(ctx, lis.Addr().String(), "127.0.0.1", l.creds(idServer), &api.WatchGenerationsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Recv(); status.Code(err) != codes.Unavailable || !strings.Contains(status.Convert(err).Message(), "nothing heard") {
		t.Fatalf("a silent key server: %v", err)
	}
}

// FuzzWatchFrame: readFrame takes any bytes without panicking, bounds
// what it reads, and reads back what appendFrame wrote.
func FuzzWatchFrame(f *testing.F) {
	ev, _ := appendFrame(nil, frameEvent, &api.GenerationEvent{Kind: api.GenerationEvent_ROTATED, Pair: &api.Pair{A: 3, B: 7}, Generation: 2, Reason: "r"})
	f.Add(ev)
	f.Add([]byte{framePing, 0, 0, 0})
	f.Add([]byte{framePing, 0, 0, 1, 0})
	f.Add([]byte{frameEnd, 0xff, 0xff, 0xff})
	f.Add([]byte{0, 0, 0, 0})
	f.Add([]byte{frameRequest, 0, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		kind, payload, err := readFrame(bytes.NewReader(b), nil, maxFramePayload)
		if err != nil {
			return
		}
		if len(payload) > maxFramePayload || len(b) < 4+len(payload) || kind < frameRequest || kind > framePing {
			t.Fatalf("read kind %d, %d bytes from %d", kind, len(payload), len(b))
		}
		if !bytes.Equal(payload, b[4:4+len(payload)]) {
			t.Fatal("payload differs")
		}
		var m api.GenerationEvent
		if proto.Unmarshal(payload, &m) == nil && kind == frameEvent {
			again, err := appendFrame(nil, frameEvent, &m)
			if err != nil {
				t.Fatal(err)
			}
			k, p, err := readFrame(bytes.NewReader(again), nil, maxFramePayload)
			var m2 api.GenerationEvent
			if err != nil || k != frameEvent || proto.Unmarshal(p, &m2) != nil || !proto.Equal(&m, &m2) {
				t.Fatalf("round trip: %v", err)
			}
		}
	})
}

// FuzzWatchStream: whatever a key server (or one posing as it) sends, the
// client's stream returns events or ends with a status; it never panics.
func FuzzWatchStream(f *testing.F) {
	ev, _ := appendFrame(nil, frameEvent, &api.GenerationEvent{Kind: api.GenerationEvent_SNAPSHOT_DONE})
	end, _ := appendFrame(nil, frameEnd, status.New(codes.PermissionDenied, "device revoked").Proto())
	f.Add(append(append([]byte{framePing, 0, 0, 0}, ev...), end...))
	f.Add([]byte{frameRequest, 0, 0, 0})
	f.Add([]byte{frameEnd, 0, 0, 2, 0xff, 0xff})
	f.Add([]byte{frameEvent, 0, 0, 3, 8, 0xff, 0xff})
	f.Fuzz(func(t *testing.T, b []byte) {
		client, server := net.Pipe()
		defer client.Close()
		go func() {
			server.Write(b)
			server.Close()
		}()
		s := &wireStream{ctx: context.Background(), conn: client, addr: "fuzz", stop: func() bool { return true }}
		for range 100 {
			_, err := s.Recv()
			if err == nil {
				continue
			}
			if err != io.EOF && status.Code(err) == codes.Unknown {
				t.Fatalf("an end without a status: %v", err)
			}
			if _, again := s.Recv(); again != err {
				t.Fatalf("the stream ended with %v, then %v", err, again)
			}
			return
		}
	})
}

// TestWatchKeepsNoRegistry: an open stream does not keep the registry as
// it was when it opened (10,000 streams opened at different times would
// keep as many versions of it alive).
func TestWatchKeepsNoRegistry(t *testing.T) {
	eachTransport(t, func(t *testing.T, lean bool) {
		l := newLab(t)
		l.lean = lean
		admin := setup(t, l)
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		st, err := l.svc.store.View(ctx)
		if err != nil {
			t.Fatal(err)
		}
		opened := weak.Make(st)
		st = nil
		stream, err := l.client(idServer).WatchGenerations(ctx, &api.WatchGenerationsRequest{})
		if err != nil {
			t.Fatal(err)
		}
		snapshotDone(t, stream)
		if _, err := admin.AddDevice(ctx, &api.AddDeviceRequest{Name: "web9", Role: "server", Enclave: 3, ServerId: u32(99)}); err != nil {
			t.Fatal(err)
		}
		waitFor(t, func() bool {
			runtime.GC()
			return opened.Value() == nil
		})
		_ = stream
	})
}

// TestWatchRevokedWhileSubscribing: a device revoked after it was
// identified but before its stream joined the hub (so that the hub's
// REVOKED never reached it) is refused, not served a stream that no
// revocation can end.
func TestWatchRevokedWhileSubscribing(t *testing.T) {
	eachTransport(t, func(t *testing.T, lean bool) {
		t.Cleanup(func() { watchSubscribing = nil }) // after the lab's
		l := newLab(t)
		l.lean = lean
		admin := setup(t, l)
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		var once sync.Once
		watchSubscribing = func() {
			once.Do(func() {
				if _, err := admin.RevokeDevice(ctx, &api.RevokeDeviceRequest{Name: "web1"}); err != nil {
					t.Error(err)
				}
				// The hub has published it before this stream subscribes.
				waitFor(t, func() bool { st, _ := l.svc.store.View(ctx); d, _ := st.Device("web1"); return d.Revoked })
				time.Sleep(100 * time.Millisecond)
			})
		}
		stream, err := l.client(idServer).WatchGenerations(ctx, &api.WatchGenerationsRequest{})
		for err == nil {
			var ev *api.GenerationEvent
			if ev, err = stream.Recv(); err == nil && ev.Kind == api.GenerationEvent_SNAPSHOT_DONE {
				t.Fatal("a device revoked as it subscribed was served its stream")
			}
		}
		if status.Code(err) != codes.PermissionDenied {
			t.Fatalf("the stream of a device revoked as it subscribed: %v", err)
		}
	})
}

// alpnFilter is a middlebox in front of addr that drops every connection
// whose ClientHello names the watch transport and passes the others.
func alpnFilter(t *testing.T, addr string) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lis.Close() })
	go func() {
		for {
			c, err := lis.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				c.SetReadDeadline(time.Now().Add(5 * time.Second))
				var h [5]byte
				if _, err := io.ReadFull(c, h[:]); err != nil {
					return
				}
				hello := make([]byte, int(h[3])<<8|int(h[4]))
				if _, err := io.ReadFull(c, hello); err != nil || bytes.Contains(hello, []byte(WatchProtocol)) {
					return
				}
				c.SetReadDeadline(time.Time{})
				up, err := net.Dial("tcp", addr)
				if err != nil {
					return
				}
				defer up.Close()
				up.Write(append(h[:], hello...))
				go io.Copy(up, c)
				io.Copy(c, up)
			}()
		}
	}()
	return lis.Addr().String()
}

// TestWatchTransportBlocked: behind a middlebox that drops the watch
// transport's handshakes but passes gRPC's, a client watches over gRPC
// after fallbackAfter failed handshakes, rather than never.
func TestWatchTransportBlocked(t *testing.T) {
	l := newLab(t)
	setup(t, l)
	addr := alpnFilter(t, l.addr)
	c := l.creds(idServer)
	conn, err := Dial(addr, "127.0.0.1", c)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	kc, err := WithWatchTransport(api.NewKeyServiceClient(conn), addr, "127.0.0.1", NewLive(c), nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var stream api.KeyService_WatchGenerationsClient
	for try := 1; ; try++ {
		if stream, err = kc.WatchGenerations(ctx, &api.WatchGenerationsRequest{}); err == nil {
			if try != fallbackAfter {
				t.Fatalf("watching after %d tries, want %d", try, fallbackAfter)
			}
			break
		}
		if status.Code(err) != codes.Unavailable || try >= fallbackAfter {
			t.Fatalf("try %d: %v", try, err)
		}
	}
	if _, ok := stream.(*wireStream); ok {
		t.Fatal("watching over the blocked transport")
	}
	snapshotDone(t, stream)
}

// TestWatchTransportProxied: with a proxy set for the key service, the
// client watches over gRPC (whose connection goes through the proxy).
func TestWatchTransportProxied(t *testing.T) {
	t.Setenv("HTTPS_PROXY", "http://proxy.example:3128")
	t.Setenv("NO_PROXY", "")
	kc := api.NewKeyServiceClient(nil)
	got, err := WithWatchTransport(kc, "keyserver.example:8443", "", NewLive(nil), nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := got.(*watchClient); ok {
		t.Fatal("a proxied key service watched over the transport")
	}
	t.Setenv("NO_PROXY", "keyserver.example")
	if got, _ = WithWatchTransport(kc, "keyserver.example:8443", "", NewLive(nil), nil); got == kc {
		t.Fatal("a key service the proxy is not for watched over gRPC")
	}
}

// TestWatchTransportRefusedNoFallback: a key server that takes the
// connection and closes it (its bounds full, overloaded, restarting)
// fails a handshake offering gRPC as well: its devices stay on the
// transport, retrying, rather than move to gRPC for ten minutes.
func TestWatchTransportRefusedNoFallback(t *testing.T) {
	l := newLab(t)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer lis.Close()
	go func() {
		for {
			c, err := lis.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	c := l.creds(idServer)
	kc, err := WithWatchTransport(api.NewKeyServiceClient(nil), lis.Addr().String(), "127.0.0.1", NewLive(c), nil)
	if err != nil {
		t.Fatal(err)
	}
	for try := range 2 * fallbackAfter {
		if _, err := kc.WatchGenerations(context.Background(), &api.WatchGenerationsRequest{}); status.Code(err) != codes.Unavailable {
			t.Fatalf("try %d: %v, want Unavailable", try+1, err)
		}
	}
	if kc.(*watchClient).grpcUntil.Load() != 0 {
		t.Fatal("a key server refusing every connection sent its devices to gRPC")
	}
}

// TestWatchTransportFallbackEnds: a watch over gRPC after a fallback ends
// when the fallback does, and the next one takes the transport (a key
// server upgraded meanwhile is not watched over gRPC for as long as that
// stream would live).
func TestWatchTransportFallbackEnds(t *testing.T) {
	d := watchFallback
	t.Cleanup(func() { watchFallback = d })
	watchFallback = 300 * time.Millisecond
	l := newLab(t)
	setup(t, l)
	c := l.creds(idServer)
	conn, err := Dial(l.addr, "127.0.0.1", c)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	kc, err := WithWatchTransport(api.NewKeyServiceClient(conn), l.addr, "127.0.0.1", NewLive(c), nil)
	if err != nil {
		t.Fatal(err)
	}
	w := kc.(*watchClient)
	w.fallBack("a test", l.addr, nil)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	stream, err := kc.WatchGenerations(ctx, &api.WatchGenerationsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := stream.(*fallbackStream); !ok {
		t.Fatalf("a stream during the fallback is a %T", stream)
	}
	snapshotDone(t, stream)
	if _, err := stream.Recv(); status.Code(err) != codes.Unavailable || !strings.Contains(status.Convert(err).Message(), "trying the watch transport again") {
		t.Fatalf("the fallback's stream as it ends: %v", err)
	}
	if stream, err = kc.WatchGenerations(ctx, &api.WatchGenerationsRequest{}); err != nil {
		t.Fatal(err)
	}
	if _, ok := stream.(*wireStream); !ok {
		t.Fatalf("after the fallback, a %T", stream)
	}
}
