package gateway

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

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
	mu         sync.RWMutex                 // the clients: read per datagram, written per new agent
	clients    map[netip.AddrPort]*upstream // by the agent's data endpoint
	perSource  map[netip.Addr]int
	closed     bool
}

// upstream is one agent's pair of sockets towards its peers.
type upstream struct {
	client     netip.AddrPort // the agent's data endpoint (its control port is the next)
	data, ctrl *net.UDPConn
	last       atomic.Int64 // Unix ns of its last datagram either way
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
	return r, nil
}

func (r *relay) addr() netip.AddrPort { return r.data.LocalAddr().(*net.UDPAddr).AddrPort() }

func (r *relay) start() {
	if len(r.g.cfg.RelayTo) == 0 {
		r.g.log.Warn("an open relay (--open-relay): it forwards to any destination for anyone who reaches it (limit it with --relay-to)")
	}
	r.g.spawn(func() { r.downstream(r.data, false) })
	r.g.spawn(func() { r.downstream(r.ctrl, true) })
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

// downstream reads the agents' datagrams on one listen socket and sends
// each on, unframed, from the agent's upstream socket.
func (r *relay) downstream(c *net.UDPConn, isCtrl bool) {
	w := newWorker()
	buf := make([]byte, 65535)
	for {
		n, src, err := c.ReadFromUDPAddrPort(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue
		}
		src = netip.AddrPortFrom(src.Addr().Unmap(), src.Port())
		dst, hl, err := control.ParseRelayHeader(buf[:n])
		if err != nil {
			r.g.metrics.data("malformed")
			continue
		}
		if !r.allowed(dst) {
			r.g.metrics.data("relay_refused")
			continue
		}
		msg := buf[hl:n]
		client := src
		if isCtrl {
			if src.Port() == 0 {
				continue
			}
			client = netip.AddrPortFrom(src.Addr(), src.Port()-1)
		}
		out, pass := r.judge(w, msg, src, dst, isCtrl)
		if !pass {
			continue
		}
		// Upstream state is made only for what an agent starts with: a
		// well-formed Initiation, or a data packet that passed the core
		// (a PSP packet: an agent whose relay restarted sends data first).
		create := !isCtrl || isInitiation(msg)
		u, err := r.upstream(client, create)
		if err != nil {
			r.g.metrics.data("relay_refused")
			continue
		}
		uc := u.data
		if isCtrl {
			uc = u.ctrl
		}
		if _, err := uc.WriteToUDPAddrPort(out, dst); err != nil {
			r.g.metrics.data("failed")
		}
	}
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

// judge runs a datagram through the core: control is tagged, data read
// and judged.
func (r *relay) judge(w *worker, msg []byte, src, dst netip.AddrPort, isCtrl bool) ([]byte, bool) {
	if isCtrl {
		return r.g.onControl(msg, w.tag, src, dst)
	}
	return msg, r.g.onData(w, msg, src, dst)
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
		u = &upstream{client: client, data: d, ctrl: c}
		u.touch(now)
	}
	if u == nil {
		return nil, errors.New("gateway: no two consecutive free ports for an upstream pair")
	}
	r.clients[client] = u
	r.perSource[client.Addr()]++
	r.g.spawn(func() { r.back(u, false) })
	r.g.spawn(func() { r.back(u, true) })
	return u, nil
}

func (u *upstream) touch(now time.Time) { u.last.Store(now.UnixNano()) }

// back reads the answers on an agent's upstream socket and sends each to
// the agent, framed with its origin.
func (r *relay) back(u *upstream, isCtrl bool) {
	w := newWorker()
	c, down, to := u.data, r.data, u.client
	if isCtrl {
		c, down, to = u.ctrl, r.ctrl, netip.AddrPortFrom(u.client.Addr(), u.client.Port()+1)
	}
	buf := make([]byte, 65535)
	out := make([]byte, control.MaxRelayHeader+65535)
	for {
		n, src, err := c.ReadFromUDPAddrPort(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue
		}
		src = netip.AddrPortFrom(src.Addr().Unmap(), src.Port())
		msg, pass := r.judge(w, buf[:n], src, to, isCtrl)
		if !pass {
			continue
		}
		u.touch(r.g.cfg.Now())
		hl, err := control.PutRelayHeader(out, src)
		if err != nil || hl+len(msg) > len(out) {
			continue
		}
		m := copy(out[hl:], msg)
		if _, err := down.WriteToUDPAddrPort(out[:hl+m], to); err != nil {
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
