package keyserver

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"time"

	"google.golang.org/protobuf/proto"
)

// WatchProtocol is the ALPN name of the watch transport (issue 36): a
// generation watch on the key service's own port and TLS, without gRPC.
// A gRPC connection holds four goroutines and its HTTP/2 state for as
// long as an agent lives; a watch needs one goroutine and a few frames.
// A client offers it before "h2" and falls back to gRPC's
// WatchGenerations when a key server answers "h2" (one built before it).
//
// After the handshake the client sends one request frame; the server
// answers with event frames (the same GenerationEvents as the gRPC
// stream, in the same order), pings an idle stream, and ends it with an
// end frame carrying the gRPC status the gRPC stream would have ended
// with. A frame is a kind byte, a 24-bit big-endian payload length and
// the payload: a protobuf message, or nothing for a ping.
const WatchProtocol = "enclave-watch/1"

// Frame kinds of the watch transport.
const (
	frameRequest byte = 1 // client to server, once: api.WatchGenerationsRequest
	frameEvent   byte = 2 // server to client: api.GenerationEvent
	frameEnd     byte = 3 // server to client, last: google.rpc.Status
	framePing    byte = 4 // server to client, empty: the stream is alive
)

// Bounds of the watch transport.
const (
	// maxFramePayload bounds a frame (an event is a few dozen bytes; an
	// end status carries a message of at most a few hundred).
	maxFramePayload = 64 << 10
	// maxRequestPayload bounds the request a server reads before it
	// knows who sends it (a request is empty today).
	maxRequestPayload = 1 << 10
	// WatchPingInterval is how long an idle stream waits for a ping; a
	// client that hears nothing for WatchSilence takes the key server for
	// gone and reconnects (gRPC's stream had no such bound).
	WatchPingInterval = 15 * time.Second
	WatchSilence      = 4 * WatchPingInterval
	// watchWriteTimeout bounds one write: a client that does not read
	// holds its place only this long.
	watchWriteTimeout = 10 * time.Second
	// watchFlushBytes is how much a stream gathers before it writes
	// (TLS keeps a buffer as large as the largest record it sent).
	watchFlushBytes = 512
)

// The bounds above as the code reads them (tests shorten them).
var (
	watchPing    = WatchPingInterval
	watchSilence = WatchSilence
	// watchRequestTimeout bounds the wait for a client's request after
	// its handshake.
	watchRequestTimeout = 10 * time.Second
)

// ErrWatchFrame: a frame of the watch transport that is malformed (an
// unknown kind, a length past the bound, a payload that does not parse).
var ErrWatchFrame = errors.New("keyserver: malformed watch frame")

// appendFrame appends a frame of kind carrying m (nil: empty) to dst.
func appendFrame(dst []byte, kind byte, m proto.Message) ([]byte, error) {
	start := len(dst)
	dst = append(dst, kind, 0, 0, 0)
	if m != nil {
		var err error
		if dst, err = (proto.MarshalOptions{}).MarshalAppend(dst, m); err != nil {
			return dst[:start], err
		}
	}
	n := len(dst) - start - 4
	if n > maxFramePayload {
		return dst[:start], fmt.Errorf("%w: a payload of %d bytes (at most %d)", ErrWatchFrame, n, maxFramePayload)
	}
	dst[start+1], dst[start+2], dst[start+3] = byte(n>>16), byte(n>>8), byte(n)
	return dst, nil
}

// readFrame reads one frame of at most limit payload bytes from r and
// returns its kind and payload, read into buf's memory when it is large
// enough (a caller keeps the payload as its next buf).
func readFrame(r io.Reader, buf []byte, limit int) (kind byte, payload []byte, err error) {
	var h [4]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return 0, nil, err
	}
	kind = h[0]
	n := int(binary.BigEndian.Uint32(h[:]) & 0xffffff)
	switch {
	case kind < frameRequest || kind > framePing:
		return 0, nil, fmt.Errorf("%w: kind %d", ErrWatchFrame, kind)
	case n > limit:
		return 0, nil, fmt.Errorf("%w: a payload of %d bytes (at most %d)", ErrWatchFrame, n, limit)
	case kind == framePing && n != 0:
		return 0, nil, fmt.Errorf("%w: a ping of %d bytes", ErrWatchFrame, n)
	}
	if cap(buf) < n {
		buf = make([]byte, n)
	}
	payload = buf[:n]
	if _, err := io.ReadFull(r, payload); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return 0, nil, err
	}
	return kind, payload, nil
}
