package gateway

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/enclavekeys/enclave/internal/batch"
	"github.com/enclavekeys/enclave/internal/control"
)

// The relay front end: a gateway any agent can send through without root
// on either side. Agents started with --via send every datagram to the
// relay's data port (data) or the next port (control), framed with the
// destination (control.PutRelayHeader). For each agent the relay keeps a
// pair of upstream sockets on consecutive ports (data, control, as an
// agent's own ports are: a server takes the data port to be the control
// port less one), forwards the agent's datagrams from them unframed, and
// the answers back framed with their origin. Every datagram passes the
// same core as inline: handshakes are tagged, data is read where the
// gateway may, policy is enforced.

const (
	maxRelayClients = 1024
	// maxRelayPerSource bounds the agents one address may have upstream
	// sockets for: many source ports of one host cannot fill the table,
	// and a NAT may still carry a few hundred agents.
	maxRelayPerSource = 256
	// relayIdle: an agent's upstream sockets are closed after this long
	// without a datagram either way.
	relayIdle = 10 * time.Minute
)

type relay struct {
	g          *Gateway
	data, ctrl *net.UDPConn
	// dataIn reads the agents' data (downstreamData's only), made with
	// the socket so that receive coalescing is on before the first run.
	dataIn    *batch.Conn
	mu        sync.RWMutex                 // the clients: read per datagram, written per new agent
	clients   map[netip.AddrPort]*upstream // by the agent's data endpoint
	perSource map[netip.Addr]int
	closed    bool
}

// upstream is one agent's pair of sockets towards its peers.
type upstream struct {
	client     netip.AddrPort // the agent's data endpoint (its control port is the next)
	data, ctrl *net.UDPConn
	// dataOut writes the agent's data to its peers in batches and runs
	// (the data downstream goroutine's only).
	dataOut *batch.Conn
	// dataIn reads the peers' answers (backData's only). Made with the
	// socket: receive coalescing must be on before the first answer.
	dataIn *batch.Conn
	last   atomic.Int64 // Unix ns of its last datagram either way
}

func newRelay(g *Gateway, listen netip.AddrPort) (*relay, error) {
	if listen.Port() == 65535 {
		return nil, fmt.Errorf("%w: the relay's data port cannot be 65535 (control is the next port)", ErrConfig)
	}
	r := &relay{g: g, clients: map[netip.AddrPort]*upstream{}, perSource: map[netip.Addr]int{}}
	var err error
	if r.data, err = net.ListenUDP("udp", net.UDPAddrFromAddrPort(listen)); err != nil {
		return nil, fmt.Errorf("gateway: relay data port: %w", err)
	}
	port := r.data.LocalAddr().(*net.UDPAddr).AddrPort().Port()
	if r.ctrl, err = net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(listen.Addr(), port+1))); err != nil {
		r.data.Close()
		return nil, fmt.Errorf("gateway: relay control port %d: %w", port+1, err)
	}
	if r.dataIn, err = batch.New(r.data, relayMessages); err != nil {
		r.data.Close()
		r.ctrl.Close()
		return nil, fmt.Errorf("gateway: relay data port: %w", err)
	}
	return r, nil
}

// nudge tells the end of an SA that is one of the relay's agents that
// the SA is not held (blind.go): an UnknownSA framed as from the other
// end, to the agent's control port. The agent is the source of what came
// on the data port (it may have no upstream sockets yet: nothing of its
// passed), else the destination, when it has them.
func (r *relay) nudge(src, dst netip.AddrPort, spi uint32, fromAgent bool) {
	agent, peer := src, dst
	if !fromAgent {
		r.mu.RLock()
		_, ok := r.clients[dst]
		r.mu.RUnlock()
		if !ok {
			return
		}
		agent, peer = dst, src
	}
	var buf [control.MaxRelayHeader + control.UnknownSALen]byte
	hl, err := control.PutRelayHeader(buf[:], netip.AddrPortFrom(peer.Addr(), peer.Port()+1))
	if err != nil {
		return
	}
	msg, err := control.AppendUnknownSA(buf[hl:hl], spi)
	if err != nil {
		return
	}
	r.ctrl.WriteToUDPAddrPort(buf[:hl+len(msg)], netip.AddrPortFrom(agent.Addr(), agent.Port()+1))
}

func (r *relay) addr() netip.AddrPort { return r.data.LocalAddr().(*net.UDPAddr).AddrPort() }

func (r *relay) start() {
	if len(r.g.cfg.RelayTo) == 0 {
		r.g.log.Warn("an open relay (--open-relay): it forwards to any destination for anyone who reaches it (limit it with --relay-to)")
	}
	r.g.nudge = r.nudge
	r.g.spawn(r.downstreamData)
	r.g.spawn(r.downstream)
	r.g.spawn(r.sweep)
}

func (r *relay) close() {
	r.mu.Lock()
	r.closed = true
	for _, u := range r.clients {
		u.data.Close()
		u.ctrl.Close()
	}
	r.mu.Unlock()
	r.data.Close()
	r.ctrl.Close()
}

// downstream reads the agents' control datagrams on the control listen
// socket and sends each on, unframed and tagged, from the agent's
// upstream control socket. (Data goes through downstreamData, in
// batches.)
func (r *relay) downstream() {
	w := newWorker()
	buf := make([]byte, 65535)
	for {
		n, src, err := r.ctrl.ReadFromUDPAddrPort(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue
		}
		src = netip.AddrPortFrom(src.Addr().Unmap(), src.Port())
		dst, hl, ok := r.destination(buf[:n])
		if !ok || src.Port() == 0 {
			continue
		}
		msg := buf[hl:n]
		client := netip.AddrPortFrom(src.Addr(), src.Port()-1)
		out, pass := r.g.onControl(msg, w.tag, src, dst)
		if !pass {
			continue
		}
		// Upstream state is made only for what an agent starts with: a
		// well-formed Initiation here, or a data packet that passed the
		// core (a PSP packet: an agent whose relay restarted sends data
		// first).
		u, err := r.upstream(client, isInitiation(msg))
		if err != nil {
			r.g.metrics.data("relay_refused")
			continue
		}
		if _, err := u.ctrl.WriteToUDPAddrPort(out, dst); err != nil {
			r.g.metrics.data("failed")
		}
	}
}

// destination reads the framing of an agent's datagram: where it goes
// and the framing's length, or false (counted) for a bad framing or a
// destination the relay does not forward to.
func (r *relay) destination(d []byte) (netip.AddrPort, int, bool) {
	dst, hl, err := control.ParseRelayHeader(d)
	if err != nil {
		r.g.metrics.data("malformed")
		return dst, 0, false
	}
	if !r.allowed(dst) {
		r.g.metrics.data("relay_refused")
		return dst, 0, false
	}
	return dst, hl, true
}

// allowed reports whether the relay forwards to dst.
func (r *relay) allowed(dst netip.AddrPort) bool {
	if len(r.g.cfg.RelayTo) == 0 {
		return true
	}
	for _, p := range r.g.cfg.RelayTo {
		if p.Contains(dst.Addr()) {
			return true
		}
	}
	return false
}

// isInitiation reports whether a control datagram is a well-formed
// Initiation.
func isInitiation(msg []byte) bool {
	h, err := control.ParseHeader(msg)
	if err != nil || h.Type != control.TypeInitiation {
		return false
	}
	_, err = control.ParseInitiation(msg)
	return err == nil
}

// errRelayRefused: no upstream sockets for this agent (its source holds
// its share, or its first datagram is not one an agent starts with).
var errRelayRefused = errors.New("gateway: relay refused a new agent")

// upstream returns the agent's upstream sockets, making them (and their
// readers) at its first datagram when create allows. A source address
// holds at most maxRelayPerSource agents; when the table is full, the
// agent quiet longest gives way.
func (r *relay) upstream(client netip.AddrPort, create bool) (*upstream, error) {
	now := r.g.cfg.Now()
	r.mu.RLock()
	u, closed := r.clients[client], r.closed
	r.mu.RUnlock()
	if u != nil && !closed {
		u.touch(now)
		return u, nil
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return nil, net.ErrClosed
	}
	if u := r.clients[client]; u != nil {
		u.touch(now)
		return u, nil
	}
	if !create || r.perSource[client.Addr()] >= maxRelayPerSource {
		return nil, errRelayRefused
	}
	if len(r.clients) >= maxRelayClients {
		r.evictLocked()
	}
	ip := r.addr().Addr()
	for try := 0; try < 32 && u == nil; try++ {
		d, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(ip, 0)))
		if err != nil {
			return nil, err
		}
		p := d.LocalAddr().(*net.UDPAddr).AddrPort().Port()
		if p == 65535 {
			d.Close()
			continue
		}
		c, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(ip, p+1)))
		if err != nil {
			d.Close()
			continue
		}
		out, err := batch.New(d, batch.MaxSegments)
		var in *batch.Conn
		if err == nil {
			in, err = batch.New(d, 1)
		}
		if err != nil {
			d.Close()
			c.Close()
			return nil, err
		}
		u = &upstream{client: client, data: d, ctrl: c, dataOut: out, dataIn: in}
		u.touch(now)
	}
	if u == nil {
		return nil, errors.New("gateway: no two consecutive free ports for an upstream pair")
	}
	r.clients[client] = u
	r.perSource[client.Addr()]++
	r.g.spawn(func() { r.backData(u) })
	r.g.spawn(func() { r.back(u) })
	return u, nil
}

func (u *upstream) touch(now time.Time) { u.last.Store(now.UnixNano()) }

// back reads the answers on an agent's upstream control socket and sends
// each to the agent, framed with its origin. (Data goes through
// backData, in batches.)
func (r *relay) back(u *upstream) {
	w := newWorker()
	to := netip.AddrPortFrom(u.client.Addr(), u.client.Port()+1)
	buf := make([]byte, 65535)
	out := make([]byte, control.MaxRelayHeader+65535)
	for {
		n, src, err := u.ctrl.ReadFromUDPAddrPort(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue
		}
		src = netip.AddrPortFrom(src.Addr().Unmap(), src.Port())
		msg, pass := r.g.onControl(buf[:n], w.tag, src, to)
		if !pass {
			continue
		}
		u.touch(r.g.cfg.Now())
		hl, err := control.PutRelayHeader(out, src)
		if err != nil || hl+len(msg) > len(out) {
			continue
		}
		m := copy(out[hl:], msg)
		if _, err := r.ctrl.WriteToUDPAddrPort(out[:hl+m], to); err != nil {
			r.g.metrics.data("failed")
		}
	}
}

// sweep closes the upstream sockets of agents gone quiet.
func (r *relay) sweep() {
	t := time.NewTicker(time.Minute)
	defer t.Stop()
	for {
		select {
		case <-r.g.ctx.Done():
			return
		case <-t.C:
		}
		now := r.g.cfg.Now()
		r.mu.Lock()
		for _, u := range r.clients {
			if now.Sub(time.Unix(0, u.last.Load())) > relayIdle {
				r.dropLocked(u)
			}
		}
		r.mu.Unlock()
	}
}

// evictLocked closes the upstream sockets of the agent quiet longest.
func (r *relay) evictLocked() {
	var oldest *upstream
	for _, u := range r.clients {
		if oldest == nil || u.last.Load() < oldest.last.Load() {
			oldest = u
		}
	}
	if oldest != nil {
		r.dropLocked(oldest)
		r.g.metrics.data("relay_evicted")
	}
}

// dropLocked closes an agent's upstream sockets and forgets it.
func (r *relay) dropLocked(u *upstream) {
	u.data.Close()
	u.ctrl.Close()
	delete(r.clients, u.client)
	if r.perSource[u.client.Addr()]--; r.perSource[u.client.Addr()] <= 0 {
		delete(r.perSource, u.client.Addr())
	}
}
