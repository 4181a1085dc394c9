package keyserver

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/enclavekeys/enclave/internal/api"
	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/registry"
)

// hub fans rotation and revocation events out to the watch streams.
type hub struct {
	mu   sync.Mutex
	subs map[*subscription]struct{}
	// per counts each device's open streams; max and maxPer bound the
	// replica's and one device's (issue 36: a reconnect storm, or one
	// stolen certificate opening streams, cannot take the replica).
	per         map[string]int
	max, maxPer int
	transports  map[string]int // open streams by transport
}

// The transports a watch stream goes over, as metrics name them.
const (
	transportWatch = "watch"
	transportGRPC  = "grpc"
)

// Default bounds on watch streams.
const (
	DefaultMaxWatchers          = 20000
	DefaultMaxWatchersPerDevice = 4
)

// errTooManyWatchers: a watch over the replica's or the device's bound.
var errTooManyWatchers = errors.New("keyserver: too many watch streams")

// subscription is one watch stream's place in the hub: the events it has
// not sent yet, in a queue that holds memory only while it holds events
// (a channel's buffer would hold its whole size for every watcher).
type subscription struct {
	device    string
	transport string
	mu        sync.Mutex
	queue     []*api.GenerationEvent
	ready     chan struct{} // one token: events are queued
	gone      chan struct{} // closed when the hub drops a slow subscriber
	once      sync.Once
}

// maxQueued bounds a stream's unsent events: one further behind is
// dropped (it reconnects and takes a snapshot).
const maxQueued = 256

// push queues ev; false when the queue is full.
func (sub *subscription) push(ev *api.GenerationEvent) bool {
	sub.mu.Lock()
	if len(sub.queue) >= maxQueued {
		sub.mu.Unlock()
		return false
	}
	sub.queue = append(sub.queue, ev)
	sub.mu.Unlock()
	select {
	case sub.ready <- struct{}{}:
	default:
	}
	return true
}

// take empties the queue.
func (sub *subscription) take() []*api.GenerationEvent {
	sub.mu.Lock()
	defer sub.mu.Unlock()
	q := sub.queue
	sub.queue = nil
	return q
}

func newHub(max, maxPer int) *hub {
	if max <= 0 {
		max = DefaultMaxWatchers
	}
	if maxPer <= 0 {
		maxPer = DefaultMaxWatchersPerDevice
	}
	return &hub{subs: map[*subscription]struct{}{}, per: map[string]int{}, max: max, maxPer: maxPer, transports: map[string]int{}}
}

// subscribe opens a stream for device over transport, within the bounds;
// the error says which bound refused it.
func (h *hub) subscribe(device, transport string) (*subscription, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	switch {
	case len(h.subs) >= h.max:
		return nil, fmt.Errorf("%w: this key server serves %d watch streams, its bound (--max-watchers): try another replica, or later", errTooManyWatchers, h.max)
	case h.per[device] >= h.maxPer:
		return nil, fmt.Errorf("%w: %s has %d watch streams open here, its bound (--max-watchers-per-device)", errTooManyWatchers, device, h.maxPer)
	}
	sub := &subscription{device: device, transport: transport, ready: make(chan struct{}, 1), gone: make(chan struct{})}
	h.subs[sub] = struct{}{}
	h.per[device]++
	h.transports[transport]++
	return sub, nil
}

func (h *hub) unsubscribe(sub *subscription) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.drop(sub)
}

// drop takes sub out of the hub, once (called under h.mu).
func (h *hub) drop(sub *subscription) {
	if _, ok := h.subs[sub]; !ok {
		return
	}
	delete(h.subs, sub)
	if h.per[sub.device]--; h.per[sub.device] <= 0 {
		delete(h.per, sub.device)
	}
	h.transports[sub.transport]--
}

// over is how many watch streams are open over transport.
func (h *hub) over(transport string) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.transports[transport]
}

// watchers is how many watch streams are open.
func (h *hub) watchers() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.subs)
}

// publish sends each rotation to the subscribers it concerns under st, and
// a REVOKED event to the streams of revoked devices. A subscriber too slow
// to keep up is dropped (its stream ends; reconnecting gives a snapshot),
// so publishing never blocks.
func (h *hub) publish(st *registry.State, rotations []registry.RotationEvent, revoked []string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for sub := range h.subs {
		d, ok := st.Device(sub.device)
		var kp []registry.Pair // the pairs of d's keys, once a rotation needs them
		made := false
		for _, r := range rotations {
			if !r.Outcome.Took() || !ok {
				continue
			}
			if !made {
				kp, made = keyPairs(st, d), true
			}
			for _, p := range kp { // each key of d under the rotated level-1 pair
				if st.Top(p) == r.Pair {
					h.send(sub, &api.GenerationEvent{Kind: api.GenerationEvent_ROTATED, Pair: apiPair(p), Generation: uint32(r.Generation), At: timestamppb.New(r.At), Reason: r.Reason})
				}
			}
		}
		for _, name := range revoked {
			switch {
			case name == sub.device:
				h.send(sub, &api.GenerationEvent{Kind: api.GenerationEvent_REVOKED, Reason: "device revoked"})
			case ok && hearsRevocations(d.Role):
				h.send(sub, &api.GenerationEvent{Kind: api.GenerationEvent_DEVICE_REVOKED, Device: name, Reason: "device revoked"})
			}
		}
	}
}

// publishChanges tells each subscriber of the pairs allowed or forbidden
// that concern it (under the registry before or after) and of a change of
// its own grant, with a CHANGED event: it fetches its keys again.
func (h *hub) publishChanges(st, prev *registry.State, pairs []registry.Pair, grants []string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for sub := range h.subs {
		d, ok := st.Device(sub.device)
		if !ok {
			continue
		}
		// Told only when the pairs it holds keys of change: a rule on a
		// sibling sub-pair, or on a pair it holds nothing under, is not
		// its business (DESIGN §3a); a sub-enclave registered under an
		// allowed pair is (its servers need a key towards it).
		now, before := keyPairs(st, d), keyPairs(prev, d)
		if !slices.Equal(now, before) {
			reason, p := "pairs changed", registry.Pair{}
			if q, ok := firstMissing(now, before); ok {
				reason, p = "pair allowed", q
			} else if q, ok := firstMissing(before, now); ok {
				reason, p = "pair forbidden", q
			}
			h.send(sub, &api.GenerationEvent{Kind: api.GenerationEvent_CHANGED, Pair: apiPair(p), Reason: reason})
		}
		if slices.Contains(grants, sub.device) {
			h.send(sub, &api.GenerationEvent{Kind: api.GenerationEvent_CHANGED, Reason: "grant changed"})
		}
	}
}

// publishEndpoints tells each subscriber of an enclave that may talk with
// a server whose directory entry changed, with an ENDPOINT event naming
// the server: it looks the server up again.
func (h *hub) publishEndpoints(st *registry.State, servers []string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for sub := range h.subs {
		d, ok := st.Device(sub.device)
		if !ok || d.Enclave == 0 {
			continue
		}
		for _, name := range servers {
			srv, ok := st.Device(name)
			if ok && name != d.Name && st.PairAllowed(registry.NewPair(srv.Enclave, d.Enclave)) {
				h.send(sub, &api.GenerationEvent{Kind: api.GenerationEvent_ENDPOINT, Device: name, Reason: "endpoint changed"})
			}
		}
	}
}

// keyPairs are the pairs of the keys device d is given under st, sorted:
// a server's pairs with each enclave it may talk to, an enclave key
// server's level-1 pairs, a gateway's or monitor's granted pairs.
func keyPairs(st *registry.State, d registry.Device) []registry.Pair {
	var out []registry.Pair
	switch d.Role {
	case ca.RoleServer:
		if d.Enclave != 0 {
			for _, j := range st.Peers(d.Enclave) {
				out = append(out, registry.NewPair(d.Enclave, j))
			}
		}
	case ca.RoleKeyserver:
		if d.Enclave != 0 {
			out = st.PairsOf(d.Enclave)
		}
	case ca.RoleGateway, ca.RoleMonitor:
		out = st.GrantedPairs(d.Name)
	}
	slices.SortFunc(out, func(a, b registry.Pair) int { return int(a.A)<<16 + int(a.B) - int(b.A)<<16 - int(b.B) })
	return out
}

// firstMissing is the first pair of a not in b.
func firstMissing(a, b []registry.Pair) (registry.Pair, bool) {
	for _, p := range a {
		if !slices.Contains(b, p) {
			return p, true
		}
	}
	return registry.Pair{}, false
}

func (h *hub) send(sub *subscription, ev *api.GenerationEvent) {
	if !sub.push(ev) {
		sub.once.Do(func() { close(sub.gone) })
		h.drop(sub)
	}
}

// hearsRevocations reports whether a role is told of other devices'
// revocations: those that accept handshakes or forward them, and clients
// (so that they refuse a revoked server).
func hearsRevocations(r ca.Role) bool {
	return r == ca.RoleServer || r == ca.RoleKeyserver || r == ca.RoleGateway || r == ca.RoleClient
}

func apiPair(p registry.Pair) *api.Pair { return &api.Pair{A: uint32(p.A), B: uint32(p.B)} }

// WatchGenerations implements api.KeyServiceServer: first a SNAPSHOT of every
// pair that concerns the caller, then rotations as they happen, until the
// client leaves, the caller is revoked, or it falls too far behind. The
// watch transport (WatchProtocol) serves the same stream without gRPC.
func (s *Service) WatchGenerations(_ *api.WatchGenerationsRequest, stream api.KeyService_WatchGenerationsServer) error {
	c, err := s.identify(stream.Context(), watchRPC)
	if err != nil {
		return err
	}
	if p, ok := peer.FromContext(stream.Context()); ok && hostOf(p.Addr).IsValid() {
		c.source = hostOf(p.Addr).String() // the watch-open summaries name it
	}
	return s.watch(stream.Context(), c, grpcSink{stream})
}

// watchSubscribing, when set (by tests), runs as a stream subscribes.
var watchSubscribing func()

const watchRPC = "WatchGenerations"

// watchSink is where a watch stream's events go: a gRPC stream, or a
// connection of the watch transport.
type watchSink interface {
	// send sends ev, or gathers it until flush.
	send(ev *api.GenerationEvent) error
	// flush writes what send gathered.
	flush() error
	// pings is how long an idle stream waits before ping (0: never).
	pings() time.Duration
	ping() error
	// transport names what it goes over, for the metrics.
	transport() string
}

// grpcSink is a gRPC stream: each event sent at once, no pings of ours
// (HTTP/2 has its own).
type grpcSink struct {
	api.KeyService_WatchGenerationsServer
}

func (g grpcSink) send(ev *api.GenerationEvent) error { return g.Send(ev) }
func (grpcSink) flush() error                         { return nil }
func (grpcSink) pings() time.Duration                 { return 0 }
func (grpcSink) ping() error                          { return nil }
func (grpcSink) transport() string                    { return transportGRPC }

// watch serves caller c's stream into out, until ctx ends (the client
// left), the service stops, c is revoked or falls behind; the error is
// the status the stream ends with.
func (s *Service) watch(ctx context.Context, c *caller, out watchSink) error {
	const rpc = watchRPC
	if c.id.Role == ca.RoleAdmin {
		return s.refuse(c, rpc, codes.PermissionDenied, rpc+" is for devices; "+c.id.Name+" has role "+string(c.id.Role))
	}
	if watchSubscribing != nil {
		watchSubscribing()
	}
	sub, err := s.hub.subscribe(c.id.Name, out.transport())
	if err != nil {
		return s.refuse(c, rpc, codes.ResourceExhausted, err.Error())
	}
	defer s.hub.unsubscribe(sub)
	// The registry again, now that the hub tells this stream of every
	// change from here on: a revocation committed after the caller was
	// identified, but published before it subscribed, would otherwise
	// never reach it (nor end its stream).
	st, err := s.store.View(ctx)
	if err != nil {
		return status.Errorf(codes.Unavailable, "registry: %v", err)
	}
	d, err := st.Authorize(c.id, ca.Fingerprint(c.leaf))
	if err != nil {
		s.deny(c, rpc, "", nil, err.Error())
		return status.Errorf(codes.PermissionDenied, "%s: %v", c.id, err)
	}
	c.state, c.device = st, d
	if err := s.noteWatchOpen(c); err != nil {
		return err
	}
	// A pair of each key the caller holds, as it names it (a server's
	// with each peer enclave, a gateway's granted pair of any level), with
	// its level-1 pair's generation: a device needs no layout to match
	// events with its keys.
	for _, p := range keyPairs(c.state, *c.device) {
		gs, ok := c.state.Generation(p)
		if !ok {
			continue
		}
		ev := &api.GenerationEvent{Kind: api.GenerationEvent_SNAPSHOT, Pair: apiPair(p), Generation: uint32(gs.Current), At: timestamppb.New(gs.RotatedAt)}
		if err := out.send(ev); err != nil {
			return err
		}
	}
	if hearsRevocations(c.id.Role) {
		for d := range c.state.RevokedDevices() {
			if d.Name == c.id.Name {
				continue
			}
			ev := &api.GenerationEvent{Kind: api.GenerationEvent_DEVICE_REVOKED, Device: d.Name, Reason: "device revoked"}
			if d.RevokedAt != nil {
				ev.At = timestamppb.New(*d.RevokedAt)
			}
			if err := out.send(ev); err != nil {
				return err
			}
		}
	}
	if err := out.send(&api.GenerationEvent{Kind: api.GenerationEvent_SNAPSHOT_DONE}); err != nil {
		return err
	}
	if err := out.flush(); err != nil {
		return err
	}
	// From here on c (and the registry as the stream opened) is not
	// used: a stream that kept it would keep every node changed since
	// alive, one version per watcher (TestWatchKeepsNoRegistry).
	var idle <-chan time.Time
	var timer *time.Timer
	if every := out.pings(); every > 0 {
		timer = time.NewTimer(every/2 + rand.N(every/2)) // the streams opened together do not ping together
		defer timer.Stop()
		idle = timer.C
	}
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-s.stopping:
			// The service is stopping: the device reconnects (another
			// replica, or this one restarted) and gets a fresh snapshot.
			return status.Error(codes.Unavailable, "the key server is stopping")
		case <-sub.gone:
			return status.Error(codes.ResourceExhausted, "watch fell behind; reconnect for a fresh snapshot")
		case <-idle:
			if err := out.ping(); err != nil {
				return err
			}
			timer.Reset(out.pings())
		case <-sub.ready:
			for _, ev := range sub.take() {
				if err := out.send(ev); err != nil {
					return err
				}
				if ev.Kind == api.GenerationEvent_REVOKED {
					if err := out.flush(); err != nil {
						return err
					}
					return status.Error(codes.PermissionDenied, "device revoked")
				}
			}
			if err := out.flush(); err != nil {
				return err
			}
			if timer != nil {
				timer.Reset(out.pings())
			}
		}
	}
}
