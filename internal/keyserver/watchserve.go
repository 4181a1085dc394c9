package keyserver

import (
	"context"
	"crypto/tls"
	"net"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/enclavekeys/enclave/internal/api"
)

// serveWatch serves a watch over the watch transport on conn, whose
// handshake negotiated WatchProtocol with state cs: its request, then the
// same stream WatchGenerations serves, then the status it ended with.
//
// Two goroutines per stream: this one writes; the other waits in a read
// for the client to leave, so that a stream whose device went is
// dropped at once (its place counts against the device's bound).
func (srv *Server) serveWatch(conn net.Conn, cs *tls.ConnectionState) {
	start := time.Now()
	if len(cs.VerifiedChains) == 0 { // nothing to read from who cannot watch
		(&wireSink{conn: conn}).end(status.Error(codes.Unauthenticated, "a watch needs a device certificate the key server trusts"))
		return
	}
	conn.SetReadDeadline(start.Add(watchRequestTimeout))
	kind, payload, err := readFrame(conn, nil, maxRequestPayload)
	if err != nil {
		return // nothing asked: nothing to answer
	}
	out := &wireSink{conn: conn}
	var req api.WatchGenerationsRequest
	if kind != frameRequest {
		err = status.Errorf(codes.InvalidArgument, "the watch transport expects a request frame first, not kind %d", kind)
	} else if err = proto.Unmarshal(payload, &req); err != nil {
		err = status.Errorf(codes.InvalidArgument, "malformed watch request: %v", err)
	}
	if err != nil {
		out.end(err)
		return
	}
	conn.SetReadDeadline(time.Time{})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	left := make(chan struct{})
	go func() {
		// The client sends nothing more: a read ends when it leaves (or
		// breaks the protocol), and the stream with it.
		var b [1]byte
		conn.Read(b[:])
		cancel()
		close(left)
	}()
	c, err := srv.svc.identifyTLS(ctx, cs, watchRPC)
	if err == nil {
		if a := hostOf(conn.RemoteAddr()); a.IsValid() {
			c.source = a.String() // the watch-open summaries name it
		}
		err = srv.svc.watch(ctx, c, out)
	}
	srv.svc.metrics.observe(watchRPC, start, err)
	if ctx.Err() == nil {
		out.end(err)
	}
	conn.Close()
	<-left
}

// wireSink is a watch stream over the watch transport: events gathered
// into frames and written together.
type wireSink struct {
	conn   net.Conn
	buf    *[]byte
	broken bool // a write failed: nothing more is written
}

// frameBufs hold frames while they are written: no stream keeps a buffer
// between its writes.
var frameBufs = sync.Pool{New: func() any { b := make([]byte, 0, 2*watchFlushBytes); return &b }}

func (w *wireSink) add(kind byte, m proto.Message) error {
	if w.buf == nil {
		w.buf = frameBufs.Get().(*[]byte)
	}
	b, err := appendFrame(*w.buf, kind, m)
	*w.buf = b
	if err != nil {
		return status.Errorf(codes.Internal, "watch frame: %v", err)
	}
	if len(b) >= watchFlushBytes {
		return w.flush()
	}
	return nil
}

func (w *wireSink) send(ev *api.GenerationEvent) error { return w.add(frameEvent, ev) }

func (w *wireSink) flush() error {
	if w.buf == nil {
		return nil
	}
	p := w.buf
	w.buf = nil
	defer func() {
		*p = (*p)[:0]
		frameBufs.Put(p)
	}()
	if w.broken {
		return net.ErrClosed
	}
	w.conn.SetWriteDeadline(time.Now().Add(watchWriteTimeout))
	if _, err := w.conn.Write(*p); err != nil {
		w.broken = true
		return err
	}
	return nil
}

func (w *wireSink) pings() time.Duration { return watchPing }

func (w *wireSink) transport() string { return transportWatch }

func (w *wireSink) ping() error {
	if err := w.add(framePing, nil); err != nil {
		return err
	}
	return w.flush()
}

// end writes the status the stream ends with (nil: OK).
func (w *wireSink) end(err error) {
	if w.broken {
		return
	}
	if w.add(frameEnd, status.Convert(err).Proto()) == nil {
		w.flush()
	}
}
