// Package keyserver is the Enclave key service (DESIGN §6): a gRPC server
// over mutual TLS that hands every device exactly the keys its role and
// grants allow, rotates pair generations on a schedule and on events, tells
// holders of rotations at once, and records every decision in the audit log.
package keyserver

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/enclavekeys/enclave/internal/api"
	"github.com/enclavekeys/enclave/internal/audit"
	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/registry"
	"github.com/enclavekeys/enclave/internal/store"
)

// Config assembles a Service.
type Config struct {
	Store    store.Store
	OrgKey   keys.Key
	Roots    *ca.Roots         // the org CA (or CAs, during a rollover)
	Audit    audit.Sink        // a file log, or the etcd log
	Clock    Clock             // default SystemClock
	Rotation registry.Rotation // zero fields take the defaults
	Logger   *slog.Logger      // default: discard
	Metrics  *Metrics          // optional
	// Tier is TierBoth unless set. An enclave tier serves only Enclave and
	// takes its pair keys from PairKeys (an Upstream); the other tiers
	// derive them from OrgKey.
	Tier     Tier
	Enclave  keys.EnclaveID
	PairKeys PairKeySource
	// Issuer is the key service's issuing CA, which signs the
	// certificates of hosts that join with a token (nil: it issues none).
	Issuer *ca.Authority
	// IssueDays is how long those certificates are valid (default 90).
	IssueDays int
	// MaxWatchers bounds the watch streams this replica serves, and
	// MaxWatchersPerDevice one device's (0: DefaultMaxWatchers,
	// DefaultMaxWatchersPerDevice); a stream past either is refused
	// (ResourceExhausted, saying which).
	MaxWatchers, MaxWatchersPerDevice int
	// Conns bounds the connections its gRPC server holds (nil: no
	// bounds); the listener it serves must be Conns.Listener's.
	Conns *ConnGuard
}

// Service implements the KeyService and Admin APIs.
type Service struct {
	api.UnimplementedKeyServiceServer
	api.UnimplementedAdminServer
	api.UnimplementedPairExchangeServer
	api.UnimplementedEnrollServer

	// auditDown: the audit log was last found taking no entries (its
	// change either way is logged once).
	auditDown atomic.Bool

	store    store.Store
	orgKey   keys.Key
	org      string // the root's trust domain
	audit    audit.Sink
	clock    Clock
	rotation registry.Rotation
	log      *slog.Logger
	hub      *hub
	kick     chan struct{} // wakes the scheduler after a change of schedule
	metrics  *Metrics
	tier     Tier
	enclave  keys.EnclaveID
	pairKeys PairKeySource
	throttle *throttle
	// roots and issuer are the CA bundle and the issuing CA in force:
	// SetTrust replaces them (SIGHUP) while the service runs.
	roots  atomic.Pointer[ca.Roots]
	issuer atomic.Pointer[ca.Authority]
	days   int
	// stopping is closed when Run's context ends: watch streams end with
	// it, so that the gRPC server stops at once.
	stopping     chan struct{}
	conns        *ConnGuard // bounds on connections (nil: none)
	opens        openLog    // watch streams opened, not yet audited
	stoppingOnce sync.Once
	// seen is when each device last got an answer from this replica, and
	// when the certificate it called with expires (device list).
	seenMu sync.Mutex
	seen   map[string]deviceSeen
	// issuance bounds the certificates issued per device and per token.
	issuance issuance
}

// deviceSeen is what a replica remembers of a device's last call.
type deviceSeen struct {
	at, certExpires time.Time
}

// noteSeen records a device's call.
func (s *Service) noteSeen(name string, at, certExpires time.Time) {
	s.seenMu.Lock()
	defer s.seenMu.Unlock()
	if s.seen == nil {
		s.seen = map[string]deviceSeen{}
	}
	s.seen[name] = deviceSeen{at, certExpires}
}

// addSeen puts what this replica saw of the devices into a status.
func (s *Service) addSeen(st *api.StatusReply) {
	s.seenMu.Lock()
	defer s.seenMu.Unlock()
	for _, d := range st.GetDevices() {
		if v, ok := s.seen[d.GetName()]; ok {
			d.LastSeen = timestamppb.New(v.at)
			d.CertExpires = timestamppb.New(v.certExpires)
		}
	}
}

// SetTrust puts a CA bundle and an issuing CA (nil: none) in force:
// directory entries are checked, and joining hosts' certificates issued
// and checked, under them from the next call on. Both must be of the
// service's org.
func (s *Service) SetTrust(roots *ca.Roots, issuer *ca.Authority) error {
	switch {
	case roots == nil:
		return errors.New("keyserver: no CA bundle")
	case roots.Org() != s.org:
		return fmt.Errorf("keyserver: the CA bundle is of org %s, the service's of %s", roots.Org(), s.org)
	case issuer != nil && issuer.Org != s.org:
		return fmt.Errorf("keyserver: the issuing CA is of org %s, the roots of %s", issuer.Org, s.org)
	}
	s.roots.Store(roots)
	s.issuer.Store(issuer)
	return nil
}

// New returns a Service. It does not start the rotation scheduler: call Run.
func New(c Config) (*Service, error) {
	if c.Store == nil || c.Roots == nil || c.Audit == nil {
		return nil, errors.New("keyserver: store, CA root and audit log are required")
	}
	org := c.Roots.Org()
	if c.Clock == nil {
		c.Clock = SystemClock{}
	}
	if c.Tier == "" {
		c.Tier = TierBoth
	}
	if (c.Tier == TierEnclave) != (c.Enclave != 0) || (c.Tier == TierEnclave) != (c.PairKeys != nil) {
		return nil, errors.New("keyserver: an enclave tier, and only an enclave tier, has an enclave and an upstream")
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	s := &Service{
		store: c.Store, orgKey: c.OrgKey, org: org, audit: c.Audit, clock: c.Clock,
		rotation: c.Rotation.WithDefaults(), log: c.Logger, hub: newHub(c.MaxWatchers, c.MaxWatchersPerDevice), kick: make(chan struct{}, 1),
		metrics: c.Metrics, tier: c.Tier, enclave: c.Enclave, pairKeys: c.PairKeys, throttle: newThrottle(),
		days: c.IssueDays, stopping: make(chan struct{}), conns: c.Conns,
	}
	if s.days <= 0 {
		s.days = DefaultIssueDays
	}
	if err := s.SetTrust(c.Roots, c.Issuer); err != nil {
		return nil, err
	}
	if s.pairKeys == nil {
		s.pairKeys = orgSource{&s.orgKey}
	}
	if s.metrics != nil {
		s.metrics.auditWritable(func() bool { return s.auditHealthy() == nil })
		s.metrics.watchers(s.hub.watchers, s.hub.over)
	}
	return s, nil
}

// Close wipes the org key from the service.
func (s *Service) Close() { s.orgKey.Zero() }

// validity describes generation g of pair state gs as seen at now.
func (s *Service) validity(gs registry.Generation, g keys.Generation) *api.Validity {
	v := &api.Validity{Generation: uint32(g), Current: g == gs.Current}
	if v.Current {
		next := gs.RotatedAt.Add(s.rotation.Interval)
		if !gs.PendingAt.IsZero() && gs.PendingAt.Before(next) {
			next = gs.PendingAt
		}
		v.ValidFrom = timestamppb.New(gs.RotatedAt)
		v.ValidUntil = timestamppb.New(next.Add(s.rotation.Grace))
	} else {
		v.ValidUntil = timestamppb.New(gs.PreviousUntil)
	}
	return v
}

// GetServerKeys implements api.KeyServiceServer.
func (s *Service) GetServerKeys(ctx context.Context, _ *api.GetServerKeysRequest) (*api.ServerKeys, error) {
	const rpc = "GetServerKeys"
	c, err := s.authorize(ctx, rpc, ca.RoleServer)
	if err != nil {
		return nil, err
	}
	switch {
	case s.tier == TierOrg:
		return nil, s.refuse(c, rpc, codes.FailedPrecondition, "this is an org-tier key server; servers get their keys from their enclave's key server")
	case s.tier == TierEnclave && c.state.TopEnclave(c.device.Enclave) != s.enclave:
		return nil, s.refuse(c, rpc, codes.PermissionDenied, fmt.Sprintf("this key server serves enclave %s; %s is in enclave %s", c.state.ID(s.enclave), c.id.Name, c.state.ID(c.device.Enclave)))
	}
	i, k := c.device.Enclave, *c.device.ServerID
	l := c.state.Layout()
	now := s.clock.Now()
	out := &api.ServerKeys{Layout: c.state.EnclaveLayout}
	var entries []audit.Entry
	tops := s.topKeys()
	defer tops.zero()
	for _, j := range c.state.Peers(i) {
		p := registry.NewPair(i, j)
		gs, ok := c.state.Generation(p)
		if !ok {
			continue
		}
		for _, g := range gs.Accepted(now) {
			vc := keys.VC{Enclave: i, Peer: j, Server: k}
			sk, err := tops.serverKey(ctx, l, c.state.Top(p), vc, g)
			if err != nil {
				return nil, err
			}
			out.Keys = append(out.Keys, &api.ServerKey{Enclave: uint32(i), Peer: uint32(j), Server: uint32(k), Validity: s.validity(gs, g), Key: sk[:]})
			kk, gg := uint32(k), uint32(g)
			entries = append(entries, audit.Entry{Level: "server", IDs: &audit.IDs{Enclave: uint16(i), Peer: uint16(j), Server: &kk}, Generation: &gg})
		}
	}
	if err := s.allow(c, rpc, entries, "server keys for the enclave's allowed peers"); err != nil {
		return nil, err
	}
	return out, nil
}

// GetPairKeys implements api.KeyServiceServer.
func (s *Service) GetPairKeys(ctx context.Context, req *api.GetPairKeysRequest) (*api.PairKeys, error) {
	const rpc = "GetPairKeys"
	c, err := s.identify(ctx, rpc)
	if err != nil {
		return nil, err
	}
	var entitled []registry.Pair
	switch c.id.Role {
	case ca.RoleGateway, ca.RoleMonitor:
		entitled = c.state.GrantedPairs(c.id.Name)
	case ca.RoleKeyserver:
		if c.device.Enclave == 0 {
			return nil, s.refuse(c, rpc, codes.PermissionDenied, "a key server without an enclave is an org tier; it derives pair keys itself")
		}
		if c.state.TopEnclave(c.device.Enclave) != c.device.Enclave {
			// Its enclave's level-1 pair keys would open its sibling
			// sub-enclaves' traffic too (DESIGN §3a).
			return nil, s.refuse(c, rpc, codes.PermissionDenied, fmt.Sprintf("%s is registered in sub-enclave %s: an enclave tier serves a whole level-1 enclave", c.id.Name, c.state.ID(c.device.Enclave)))
		}
		entitled = c.state.PairsOf(c.device.Enclave)
	default:
		return nil, s.refuse(c, rpc, codes.PermissionDenied, fmt.Sprintf("%s is %s %s; %s", c.id.Name, article(string(c.id.Role)), c.id.Role, purposes[rpc]))
	}
	if s.tier == TierEnclave { // it holds only its own enclave's pair keys
		var mine []registry.Pair
		for _, p := range entitled {
			if top := c.state.Top(p); top.A == s.enclave || top.B == s.enclave {
				mine = append(mine, p)
			}
		}
		entitled = mine
	}
	asked, err := checkPairs(req.GetPairs())
	if err != nil {
		return nil, s.refuse(c, rpc, codes.InvalidArgument, err.Error())
	}
	want := entitled
	if len(asked) > 0 {
		for _, p := range asked {
			if !containsPair(entitled, p) {
				return nil, s.refuse(c, rpc, codes.PermissionDenied, fmt.Sprintf("%s holds no grant for pair %s", c.id.Name, p))
			}
		}
		want = asked
	}
	if len(want) == 0 {
		why := fmt.Sprintf("%s is granted no pairs", c.id.Name)
		if g, ok := c.state.Grant(c.id.Name); ok && len(g.Pairs) > 0 {
			why = fmt.Sprintf("%s is granted pairs, but none of them is allowed to talk now (pair forbid): it reads nothing", c.id.Name)
		}
		return nil, s.refuse(c, rpc, codes.PermissionDenied, why)
	}
	now := s.clock.Now()
	l := c.state.Layout()
	out := &api.PairKeys{Layout: c.state.EnclaveLayout}
	tops := s.topKeys()
	defer tops.zero()
	var entries []audit.Entry
	for _, p := range want {
		if err := ctx.Err(); err != nil { // the caller gave up: issue and audit no more
			return nil, status.FromContextError(err).Err()
		}
		gs, ok := c.state.Generation(p)
		if !ok {
			continue
		}
		level := registry.PairLevel(l, p)
		for _, g := range gs.Accepted(now) {
			ek, err := tops.pairKeyAt(ctx, l, c.state.Top(p), level, p, g)
			if err != nil {
				return nil, err
			}
			out.Keys = append(out.Keys, &api.PairKey{Pair: &api.Pair{A: uint32(p.A), B: uint32(p.B)}, Validity: s.validity(gs, g), Key: ek[:], Level: uint32(level)})
			gg := uint32(g)
			entries = append(entries, audit.Entry{Level: "pair", IDs: &audit.IDs{Enclave: uint16(p.A), Peer: uint16(p.B)}, Generation: &gg})
		}
	}
	if err := s.allow(c, rpc, entries, "pair keys within the caller's grants"); err != nil {
		return nil, err
	}
	return out, nil
}

// AuthorizeDirectKeyExchange implements api.KeyServiceServer: a server asks
// whether a gateway may be handed the keys of SAs between two enclaves.
func (s *Service) AuthorizeDirectKeyExchange(ctx context.Context, req *api.AuthorizeDirectKeyExchangeRequest) (*api.Authorization, error) {
	const rpc = "AuthorizeDirectKeyExchange"
	c, err := s.authorize(ctx, rpc, ca.RoleServer, ca.RoleKeyserver)
	if err != nil {
		return nil, err
	}
	if req.GetEnclave() == 0 || req.GetPeer() == 0 || req.GetEnclave() > 0xffff || req.GetPeer() > 0xffff {
		return nil, s.refuse(c, rpc, codes.InvalidArgument, "enclave ids are 1 to 65535")
	}
	p := registry.NewPair(keys.EnclaveID(req.GetEnclave()), keys.EnclaveID(req.GetPeer()))
	if err := checkName("gateway", req.GetGateway()); err != nil {
		return nil, s.refuse(c, rpc, codes.InvalidArgument, err.Error())
	}
	ids := &audit.IDs{Enclave: uint16(p.A), Peer: uint16(p.B), Device: req.GetGateway()}
	// Every refusal gets one answer, whoever asks and whatever the cause
	// (no such device, revoked, not a gateway, no grant, not a party to
	// the pair): the answers would otherwise map the registry. The cause
	// is in the audit log, and refusals are charged to the caller.
	refused := func(cause string) (*api.Authorization, error) {
		s.deny(c, rpc, "sa", ids, cause)
		return &api.Authorization{Allowed: false, Reason: fmt.Sprintf("%q may not take the keys of pair %s (the key service's audit log says why)", req.GetGateway(), p)}, nil
	}
	// A party: a server in one of the pair's enclaves, an enclave tier
	// whose level-1 enclave holds one of them.
	party := p
	if c.id.Role == ca.RoleKeyserver {
		party = c.state.Top(p)
	}
	if e := c.device.Enclave; e != 0 && e != party.A && e != party.B {
		return refused(fmt.Sprintf("the caller is not in pair %s", c.state.PairName(p)))
	}
	gw, ok := c.state.Device(req.GetGateway())
	switch {
	case !ok:
		return refused(fmt.Sprintf("gateway %q is not registered", req.GetGateway()))
	case gw.Revoked:
		return refused(fmt.Sprintf("gateway %q is revoked", gw.Name))
	case gw.Role != ca.RoleGateway:
		return refused(fmt.Sprintf("%q is a %s, not a gateway", gw.Name, gw.Role))
	case !c.state.PairAllowed(p):
		return refused(fmt.Sprintf("pair %s is not allowed to talk", c.state.PairName(p)))
	case !slices.ContainsFunc(c.state.GrantedPairs(gw.Name), func(q registry.Pair) bool { return registry.Covers(c.state.Layout(), q, p) }):
		return refused(fmt.Sprintf("gateway %q holds no grant covering pair %s", gw.Name, c.state.PairName(p)))
	}
	reason := fmt.Sprintf("gateway %q is granted pair %s", gw.Name, c.state.PairName(p))
	if err := s.record(c, rpc, audit.Entry{Level: "sa", IDs: ids, Decision: audit.Allow, Reason: reason}); err != nil {
		return nil, err
	}
	return &api.Authorization{Allowed: true, Reason: reason}, nil
}

// topKeys are the level-1 pair keys one request derives its keys from,
// each fetched or derived once however many sub-pairs share it, and
// zeroed when the request is done.
type topKeys struct {
	src PairKeySource
	m   map[topGen]keys.Key
}

type topGen struct {
	top registry.Pair
	g   keys.Generation
}

func (s *Service) topKeys() *topKeys { return &topKeys{src: s.pairKeys, m: map[topGen]keys.Key{}} }

func (t *topKeys) zero() {
	for k, v := range t.m {
		v.Zero()
		t.m[k] = v
	}
}

// pairKeyAt is EK_level(p, g) (DESIGN §3a): the level-1 pair top's key
// from the pair-key source (the org key, the org tier, or the enclave
// key exchange), then each level beneath down to p's ids.
func (t *topKeys) pairKeyAt(ctx context.Context, l keys.Layout, top registry.Pair, level int, p registry.Pair, g keys.Generation) (keys.Key, error) {
	ek, ok := t.m[topGen{top, g}]
	if !ok {
		var err error
		if ek, err = t.src.PairKey(ctx, top, g); err != nil {
			return keys.Key{}, status.Errorf(status.Code(err), "pair key: %v", err)
		}
		t.m[topGen{top, g}] = ek
	}
	out, err := keys.SubPairKey(&ek, l, 2, level, p.A, p.B)
	if err != nil {
		return keys.Key{}, status.Errorf(codes.Internal, "derivation: %v", err)
	}
	return out, nil
}

// serverKey is SK(vc, g) under layout l: from the pair key of the
// deepest level above vc.
func (t *topKeys) serverKey(ctx context.Context, l keys.Layout, top registry.Pair, vc keys.VC, g keys.Generation) (keys.Key, error) {
	ek, err := t.pairKeyAt(ctx, l, top, l.Levels(), registry.NewPair(vc.Enclave, vc.Peer), g)
	if err != nil {
		return keys.Key{}, err
	}
	sk, err := keys.ServerKey(&ek, vc)
	ek.Zero()
	if err != nil {
		return keys.Key{}, status.Errorf(codes.Internal, "derivation: %v", err)
	}
	return sk, nil
}

func containsPair(ps []registry.Pair, p registry.Pair) bool {
	for _, x := range ps {
		if x == p {
			return true
		}
	}
	return false
}

// allow audits one issuance entry per key (at least one line per call).
func (s *Service) allow(c *caller, rpc string, entries []audit.Entry, reason string) error {
	if len(entries) == 0 {
		entries = []audit.Entry{{}}
		reason = "nothing to issue: " + reason
	}
	for _, e := range entries {
		e.Decision, e.Reason = audit.Allow, reason
		if err := s.record(c, rpc, e); err != nil {
			return err
		}
		if e.Level != "" {
			s.metrics.keyIssued(e.Level)
		}
	}
	return nil
}

// refuse audits a refusal and returns the gRPC error for it.
func (s *Service) refuse(c *caller, rpc string, code codes.Code, reason string) error {
	s.deny(c, rpc, "", nil, reason)
	return status.Error(code, reason)
}

// deny audits a refusal. A failure to audit a refusal is logged: the
// request is refused either way. A caller past its refusal budget is not
// audited (or logged) line by line: its refusals are counted and written as
// a summary (see throttle).
func (s *Service) deny(c *caller, rpc, level string, ids *audit.IDs, reason string) {
	s.metrics.refused(rpc)
	now := s.clock.Now()
	if !s.throttle.refused(c.throttleKey(), string(c.id.Role), rpc, now) {
		return
	}
	if c.charge != "" && !s.throttle.refused(joinAll, "join", rpc, now) {
		// Many sources at once: past one budget for all of them, their
		// refusals are summarised too (one line per flush, not one per
		// source), so that no number of addresses makes a write each.
		return
	}
	if err := s.record(c, rpc, audit.Entry{Level: level, IDs: ids, Decision: audit.Deny, Reason: reason}); err != nil {
		s.log.Error("audit write failed", "rpc", rpc, "err", err)
	}
	s.log.Warn("refused", "caller", c.id.String(), "source", c.source, "role", string(c.id.Role), "rpc", rpc, "reason", reason)
}

// flushRefusals writes the summaries of refusals not audited one by one.
func (s *Service) flushRefusals() {
	for _, e := range s.throttle.flush(s.clock.Now()) {
		if err := s.audit.Append(boundEntry(e)); err != nil {
			s.log.Error("audit write failed", "rpc", e.RPC, "err", err)
		}
		s.log.Warn("refusals summarised", "caller", e.Caller, "rpc", e.RPC, "reason", e.Reason)
	}
}

// record appends to the audit log. Nothing is issued unless it is recorded:
// a failed append fails the request.
func (s *Service) record(c *caller, rpc string, e audit.Entry) error {
	e = boundEntry(e)
	e.Caller, e.Role, e.RPC, e.Source = c.id.String(), string(c.id.Role), rpc, c.source
	if err := s.audit.Append(e); err != nil {
		s.log.Error("audit write failed", "rpc", rpc, "err", err)
		return status.Error(codes.Unavailable, "audit log unavailable; nothing issued")
	}
	return nil
}

// Ready reports whether the service can answer: its store is reachable
// and its audit log takes entries (nothing is issued unless it is
// recorded, so a full or read-only disk under the log stops every key
// fetch: say so where the operator looks).
func (s *Service) Ready(ctx context.Context) error {
	if _, err := s.store.View(ctx); err != nil {
		return err
	}
	return s.auditHealthy()
}

// auditHealthy is the audit log's Healthy, for sinks that can tell.
func (s *Service) auditHealthy() error {
	if h, ok := s.audit.(interface{ Healthy() error }); ok {
		if err := h.Healthy(); err != nil {
			if !s.auditDown.Swap(true) {
				s.log.Error("the audit log takes no entries: no key is issued and no change made until it does (running SAs go on)", "err", err)
			}
			return fmt.Errorf("audit log takes no entries, so no key is issued (running SAs go on): %w", err)
		}
		if s.auditDown.Swap(false) {
			s.log.Info("the audit log takes entries again")
		}
	}
	return nil
}

// now is the service clock in UTC.
func (s *Service) now() time.Time { return s.clock.Now().UTC() }
