// Package gateway is Enclave's intermediary (DESIGN §5.3, §5.5, §5.6, §7):
// a device on the path between enclaves that
//
//   - tags every handshake it forwards with its signed path entry, so
//     that servers learn where clients are (tag.go);
//   - reads exactly the traffic of the enclave pairs it is granted: their
//     pair keys come from the key service and open data packets through
//     the stateless opener and its cache; everything else passes
//     untouched and is counted as opaque, by pair (keys.go, data.go);
//   - inspects what it reads: a flow log, an allow/deny policy by inner
//     5-tuple and pair, a decrypted capture, metrics (flows.go,
//     policy.go, capture.go, metrics.go);
//   - gets the keys of single SAs it cannot derive by direct key exchange,
//     and has SAs formed before it started re-established through it
//     (late join), over control sessions of its own with the servers
//     (sessions.go).
//
// One core serves two thin front ends: inline on a Linux router through
// netfilter queues (inline_linux.go), and an explicit UDP relay that needs
// no privileges (relay.go). The gateway never alters an authenticated
// byte: a tagged handshake only grows by its entry, outside every
// authenticated byte, and data packets pass as they came.
package gateway

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/enclavekeys/enclave/internal/api"
	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/control"
	"github.com/enclavekeys/enclave/internal/handshake"
	"github.com/enclavekeys/enclave/internal/keyclient"
	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/sa"
)

// Config sets up a Gateway. Zero fields take the defaults.
type Config struct {
	// Credentials are the gateway's certificate (role gateway, with the
	// enclave it stands in), key, Noise static key and the org root.
	Credentials *handshake.Credentials
	// KeyService gives the gateway its granted pair keys and generation
	// updates, over mTLS.
	KeyService api.KeyServiceClient
	// KeyServiceAddr names the key service in log lines.
	KeyServiceAddr string
	// NoDerive makes the gateway a device that cannot derive keys: it
	// keeps no pair key (it learns only which pairs it is granted) and
	// gets each SA's keys by direct key exchange.
	NoDerive bool
	// Policy is the allow/deny policy (nil: everything passes).
	Policy *Policy
	// FlowLog receives one JSON line per flow when it ends (nil: none).
	FlowLog io.Writer
	// Capture receives a pcapng of the decrypted inner packets (nil: none).
	Capture io.Writer
	// CaptureFiles writes that capture to a file rotated at a size instead.
	CaptureFiles *CaptureFiles
	// DataPort is the data port the inline gateway recognises (default
	// 1000); the control port is the next one.
	DataPort uint16
	// Relay runs the relay front end on this data address (control on the
	// next port). Queues runs the inline front end on these netfilter
	// queues instead. Exactly one is set.
	Relay  netip.AddrPort
	Queues []uint16
	// RelayTo are the underlay prefixes a relay forwards to. Empty: any
	// destination, an open relay for whoever reaches it, which New refuses
	// unless OpenRelay says so.
	RelayTo   []netip.Prefix
	OpenRelay bool
	// RunsByDatagram makes the inline gateway's queues take no
	// segmentation-offloaded run whole: the kernel cuts every run before
	// queueing its datagrams one by one. (Without it, runs are taken
	// whole where the run-size program can run, and cut at the size the
	// kernel gives.)
	RunsByDatagram bool
	// FailOpen: the kernel accepts packets when the gateway's queues are
	// full, and packets the gateway fails on (rather than what it judges)
	// pass. Without it they are dropped.
	FailOpen bool
	// FlowIdle is how long a flow may be quiet before its line is written
	// (default 30s).
	FlowIdle time.Duration
	// Logger gets structured logs (default: discarded); Now is the clock.
	Logger *slog.Logger
	Now    func() time.Time
}

// Defaults and bounds.
const (
	DefaultFlowIdle = 30 * time.Second
	tick            = 200 * time.Millisecond
	maxFlows        = 1 << 18
	maxDelivered    = 1 << 16
)

// Errors of configuration.
var (
	ErrConfig = errors.New("gateway: bad configuration")
	ErrRole   = errors.New("gateway: the certificate is not a gateway's (cert issue --role gateway --enclave N) or a monitor's")
)

// Gateway is a running intermediary. Create it with New, start it with Run.
type Gateway struct {
	cfg     Config
	id      ca.Identity
	log     *slog.Logger
	metrics *Metrics
	names   pairNames // pairs as operators write them (the org's layout)

	keys    keyState
	table   *sa.KeyTable
	opener  *sa.Opener
	dkx     delivered
	flows   *flowTable
	capture *capture
	servers servers
	late    lateJoin
	// tagBudget bounds the handshakes each source may have tagged.
	tagBudget budget
	// amp bounds what the gateway adds towards unproven addresses;
	// initLen is the length of its own session initiation.
	amp     ampLimit
	initLen atomic.Int64
	// blind is what the gateway holds of pairs it cannot read yet, and
	// nudge how the front end tells an SA's ends (blind.go).
	// sizeWarned is when the log last said a handshake had no room for
	// the gateway's entry.
	sizeMu     sync.Mutex
	sizeWarned time.Time
	blind      blindState
	nudge      nudger
	rawNudger  interface{ close() }
	// started and ks are for status: when the gateway was made, and its
	// key service connection.
	started time.Time
	// certWarn says when the gateway's certificate ends soon (timers).
	certWarn handshake.CertWarner
	ks       keyclient.Tracker
	// creds are the certificate and key the gateway signs and makes
	// sessions with now (cfg.Credentials, or what SetCredentials put).
	creds atomic.Pointer[handshake.Credentials]

	own      *net.UDPConn // the gateway's own control sessions with servers
	relay    *relay
	queue    []queueRunner
	runSizes runSizes

	ctx       context.Context
	cancel    context.CancelFunc
	ready     chan struct{}
	stop      chan struct{}
	closeOnce sync.Once
	downOnce  sync.Once
	wg        sync.WaitGroup
}

// New sets up a gateway: its sockets (or queues), nothing running yet.
func New(cfg Config) (*Gateway, error) {
	c := cfg
	if c.Credentials == nil || c.KeyService == nil {
		return nil, fmt.Errorf("%w: credentials and a key service are needed", ErrConfig)
	}
	id, err := ca.IdentityOf(c.Credentials.Cert)
	if err != nil {
		return nil, err
	}
	// A monitor reads what it is granted (everything, as a rule) but
	// stands in no enclave and tags nothing: servers trust only gateways'
	// entries.
	switch {
	case id.Role == ca.RoleGateway && id.Enclave == 0:
		return nil, fmt.Errorf("%w: this gateway's certificate names no enclave, and a gateway stands in one (its signed entries place clients there): issue it with --enclave N", ErrRole)
	case id.Role != ca.RoleGateway && id.Role != ca.RoleMonitor:
		return nil, fmt.Errorf("%w (this one is a %s's)", ErrRole, id.Role)
	}
	if c.Relay.IsValid() == (len(c.Queues) > 0) {
		return nil, fmt.Errorf("%w: give a relay address or netfilter queues, one of them", ErrConfig)
	}
	if c.Relay.IsValid() && len(c.RelayTo) == 0 && !c.OpenRelay {
		return nil, fmt.Errorf("%w: a relay without destinations it may forward to is an open relay for anyone who reaches it: give them (--relay-to PREFIX), or say --open-relay", ErrConfig)
	}
	if c.DataPort == 0 {
		c.DataPort = control.DefaultDataPort
	}
	if c.DataPort == 65535 {
		return nil, fmt.Errorf("%w: the data port cannot be 65535 (the control port is the next one)", ErrConfig)
	}
	if c.FlowIdle <= 0 {
		c.FlowIdle = DefaultFlowIdle
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	g, err := newCore(c, id)
	if err != nil {
		return nil, err
	}
	if g.own, err = net.ListenUDP("udp", &net.UDPAddr{}); err != nil {
		return nil, fmt.Errorf("gateway: control socket: %w", err)
	}
	if c.Relay.IsValid() {
		g.relay, err = newRelay(g, c.Relay)
	} else {
		g.queue, err = openQueues(g, c.Queues, c.FailOpen)
	}
	if err != nil {
		g.own.Close()
		return nil, err
	}
	return g, nil
}

// newCore makes the gateway's core, without its sockets: keys, opener,
// flows, capture, sessions. (Benchmarks drive a core directly.)
func newCore(c Config, id ca.Identity) (*Gateway, error) {
	g := &Gateway{cfg: c, id: id, log: c.Logger.With("gateway", id.Name), metrics: newMetrics(),
		ready: make(chan struct{}), stop: make(chan struct{})}
	g.creds.Store(c.Credentials)
	g.started = c.Now().UTC()
	g.ks.Set(keyclient.Connecting, g.started, nil)
	g.table = sa.NewKeyTable(0)
	g.opener = sa.NewOpener(g.table, openerCache)
	g.dkx.m = map[saKey]*deliveredSA{}
	g.flows = newFlowTable(c.FlowLog, c.Policy, id.Name, &g.names)
	g.metrics.names = &g.names
	g.servers.init()
	g.late.init()
	g.amp.init()
	g.blind.init()
	g.late.refused = func() { g.metrics.lateJoin("table_full") }
	switch {
	case c.Capture != nil && c.CaptureFiles != nil:
		return nil, fmt.Errorf("%w: a capture goes to a writer or to files, not both", ErrConfig)
	case c.Capture != nil:
		var err error
		if g.capture, err = newCapture(c.Capture); err != nil {
			return nil, err
		}
	case c.CaptureFiles != nil:
		var err error
		if g.capture, err = newCaptureFiles(c.CaptureFiles); err != nil {
			return nil, err
		}
	}
	return g, nil
}

// openerCache is how many prepared SA keys the opener keeps: the SAs the
// gateway reads at speed at once.
const openerCache = 4096

// Refresh fetches the gateway's keys and grants now (as the watch stream
// and the minute's refetch do on their own).
func (g *Gateway) Refresh(ctx context.Context) error { return g.fetchKeys(ctx) }

// Identity is the gateway's own identity.
func (g *Gateway) Identity() ca.Identity { return g.id }

// Metrics are the gateway's Prometheus metrics.
func (g *Gateway) Metrics() *Metrics { return g.metrics }

// RelayAddr is the relay's data address (its control port is the next),
// or the zero value inline.
func (g *Gateway) RelayAddr() netip.AddrPort {
	if g.relay == nil {
		return netip.AddrPort{}
	}
	return g.relay.addr()
}

// Ready is closed once Run has started everything.
func (g *Gateway) Ready() <-chan struct{} { return g.ready }

// Run fetches the gateway's keys (failing if it cannot), then forwards and
// inspects until ctx ends or Close is called; it writes the remaining
// flows and flushes the capture before it returns.
func (g *Gateway) Run(ctx context.Context) error {
	g.ctx, g.cancel = context.WithCancel(ctx)
	defer g.cancel()
	go func() { // Close ends Run, and a wait for the key service with it
		select {
		case <-g.stop:
			g.cancel()
		case <-g.ctx.Done():
		}
	}()
	// The key service may not be up yet: wait for it; a refusal ends Run.
	err := keyclient.Retry(g.ctx, g.log, "pair keys", g.cfg.KeyServiceAddr, g.fetchKeys)
	if err != nil {
		g.shutdown()
		return err
	}
	g.spawn(g.watchKeys)
	g.spawn(g.readOwn)
	g.spawn(g.timers)
	if g.relay != nil {
		g.relay.start()
	}
	for _, q := range g.queue {
		g.spawn(q.run)
	}
	mode := "relay"
	if g.relay == nil {
		mode = "inline"
	}
	g.log.Info("gateway up", "mode", mode, "enclave", g.id.Enclave, "pairs", g.keys.grantedString(), "derive", !g.cfg.NoDerive, "relay", g.RelayAddr())
	close(g.ready)
	select {
	case <-g.ctx.Done():
	case <-g.stop:
	}
	g.cancel()
	g.shutdown()
	g.wg.Wait()
	g.flows.flushAll(g.cfg.Now())
	if g.capture != nil {
		g.capture.close()
	}
	g.dkx.clear()
	return nil
}

func (g *Gateway) spawn(f func()) {
	g.wg.Add(1)
	go func() {
		defer g.wg.Done()
		f()
	}()
}

// SetPolicy replaces the allow/deny policy while the gateway runs (nil:
// everything passes): new flows are judged by it at once, flows already
// recorded at their next packet. Flows and their log lines are kept.
//
// Its pair rules are read under the org's sub-enclave layout once the
// gateway has learnt it; a rule whose pair is no pair of that layout is
// an error, and the policy in force stays.
func (g *Gateway) SetPolicy(p *Policy) error {
	if l := g.names.layout.Load(); l != nil && p != nil {
		var err error
		if p, err = p.Under(*l); err != nil {
			return err
		}
	}
	g.flows.setPolicy(p)
	g.metrics.policyReloads.Inc()
	return nil
}

// policyUnder reads the policy in force under the org's layout l, learnt
// from the key service: pair rules written dotted (3.1-7.2) match from
// then on, and a rule on 3-7 covers the sub-pairs beneath it.
func (g *Gateway) policyUnder(l keys.Layout) {
	pe := g.flows.policy.Load()
	if pe.p == nil || (pe.p.layout == l && pe.p.resolved()) {
		return
	}
	p, err := pe.p.Under(l)
	if err != nil {
		// Fail closed: a policy whose pair rules cannot be read would let
		// through what its deny rules name. Every flow read is denied
		// until the policy is fixed and reloaded (SIGHUP).
		g.log.Error("the policy's pair rules do not read under the org's enclave layout: every flow the gateway reads is denied until the policy is fixed and reloaded", "layout", l.String(), "err", err)
		p = &Policy{Default: Deny, layout: l}
	}
	g.flows.setPolicy(p)
}

// Close stops the gateway: Run returns, and a gateway that never ran
// releases its sockets.
func (g *Gateway) Close() {
	g.closeOnce.Do(func() {
		close(g.stop)
		select {
		case <-g.ready:
		default:
			g.shutdown()
		}
	})
}

// shutdown closes the sockets and queues (once), ending their readers.
func (g *Gateway) shutdown() {
	g.downOnce.Do(func() {
		g.own.Close()
		if g.relay != nil {
			g.relay.close()
		}
		for _, q := range g.queue {
			q.close()
		}
		g.runSizes.close()
		if g.rawNudger != nil {
			g.rawNudger.close()
		}
	})
}

// timers expire flows, retransmit the gateway's own handshakes and send
// late-join requests.
func (g *Gateway) timers() {
	t := time.NewTicker(tick)
	defer t.Stop()
	for {
		select {
		case <-g.ctx.Done():
			return
		case <-t.C:
			now := g.cfg.Now()
			g.flows.expire(now, g.cfg.FlowIdle)
			g.servers.retransmit(g, now)
			g.lateJoinTick(now)
			g.dkx.expire(now)
			g.metrics.delivered.Set(float64(g.dkx.len()))
			g.metrics.flows.Set(float64(g.flows.len()))
			if end := g.creds.Load().Expires(); g.certWarn.Due(now, end) {
				g.metrics.certExpires.Set(float64(end.Unix()))
				g.certWarn.Check(now, end, g.log)
			}
			if g.capture != nil {
				if err := g.capture.flush(); err != nil {
					g.log.Error("the packet capture stopped: its packets are no longer written", "err", err, "what to do", "free the disk, and restart the gateway to capture again")
				}
			}
		}
	}
}

// SetCredentials replaces the gateway's certificate, key and trusted CAs
// (a reload after enclave cert renew, or during a CA rollover): entries
// and sessions from now on use them. The certificate must be valid under
// the new CAs and carry the same identity.
func (g *Gateway) SetCredentials(c *handshake.Credentials) error {
	if err := c.Replaces(g.id, g.cfg.Now()); err != nil {
		return fmt.Errorf("%w: %v", ErrConfig, err)
	}
	g.creds.Store(c)
	return nil
}
