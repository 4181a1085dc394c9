package keyserver

import (
	"context"
	"crypto/ed25519"
	"crypto/tls"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"github.com/enclavekeys/enclave/internal/api"
	"github.com/enclavekeys/enclave/internal/audit"
	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/registry"
	"github.com/enclavekeys/enclave/internal/store"
)

// ExchangeConfig sets up an enclave tier in enclave-key mode (DESIGN §3's
// alternative to an org key): it holds its own enclave key E_i and agrees
// on each pair key with the other enclaves' key servers.
type ExchangeConfig struct {
	Enclave keys.EnclaveID
	// EnclaveKey is E_i (EK(i,i,g) = KDF(E_i, "enclave-pair", ...)).
	EnclaveKey keys.Key
	// Creds are the key server's own: its Ed25519 key signs exchanges.
	Creds *Credentials
	// Peers are the addresses of the other enclaves' key servers. The map
	// is read at each exchange, so it may be filled after start.
	Peers map[keys.EnclaveID]string
	// Store and KEK keep agreed pair keys sealed, so a restart keeps them.
	Store store.Store
	KEK   *store.KEK
	Clock Clock
	Log   *slog.Logger
}

// ExchangeSource is the PairKeySource of an enclave tier in enclave-key
// mode. For a pair (i, j) the key server of the lower id starts the
// exchange, once per generation; both sides keep the result sealed.
type ExchangeSource struct {
	cfg    ExchangeConfig
	signer ed25519.PrivateKey
	mu     sync.Mutex
	agreed map[upKey]keys.Key
	busy   map[upKey]*sync.Mutex // one exchange at a time per pair and generation
}

// NewExchangeSource checks the configuration.
func NewExchangeSource(c ExchangeConfig) (*ExchangeSource, error) {
	if c.Enclave == 0 || c.Creds == nil || c.Store == nil || c.KEK == nil {
		return nil, fmt.Errorf("keyserver: enclave-key mode needs an enclave, credentials, a store and a KEK")
	}
	signer, ok := c.Creds.Cert.PrivateKey.(ed25519.PrivateKey)
	if !ok {
		return nil, fmt.Errorf("keyserver: enclave-key mode needs an Ed25519 key server certificate")
	}
	if c.Clock == nil {
		c.Clock = SystemClock{}
	}
	if c.Log == nil {
		c.Log = slog.New(slog.DiscardHandler)
	}
	return &ExchangeSource{cfg: c, signer: signer, agreed: map[upKey]keys.Key{}, busy: map[upKey]*sync.Mutex{}}, nil
}

func sealedName(p registry.Pair, g keys.Generation) string {
	return fmt.Sprintf("pair-key/%d-%d/%d", p.A, p.B, g)
}

// load returns an agreed key from memory or the store.
func (x *ExchangeSource) load(ctx context.Context, p registry.Pair, g keys.Generation) (keys.Key, bool, error) {
	x.mu.Lock()
	k, ok := x.agreed[upKey{p, g}]
	x.mu.Unlock()
	if ok {
		return k, true, nil
	}
	sealed, err := x.cfg.Store.Sealed(ctx, x.secretName(p, g))
	if err != nil || sealed == nil {
		return keys.Key{}, false, err
	}
	plain, err := x.cfg.KEK.Open(x.secretName(p, g), sealed)
	if err != nil {
		return keys.Key{}, false, err
	}
	k, err = keys.KeyFromBytes(plain)
	clear(plain)
	if err != nil {
		return keys.Key{}, false, err
	}
	x.mu.Lock()
	x.agreed[upKey{p, g}] = k
	x.mu.Unlock()
	return k, true, nil
}

// secretName is per holder: both enclaves' key servers may share a store.
func (x *ExchangeSource) secretName(p registry.Pair, g keys.Generation) string {
	return fmt.Sprintf("enclave-%d/%s", x.cfg.Enclave, sealedName(p, g))
}

// save keeps an agreed key; a key already kept for the same pair and
// generation wins (the exchange runs once per generation).
func (x *ExchangeSource) save(ctx context.Context, p registry.Pair, g keys.Generation, k keys.Key) (keys.Key, error) {
	sealed, err := x.cfg.KEK.Seal(x.secretName(p, g), k[:])
	if err != nil {
		return keys.Key{}, err
	}
	stored, err := x.cfg.Store.PutSealedOnce(ctx, x.secretName(p, g), sealed)
	if err != nil {
		return keys.Key{}, err
	}
	plain, err := x.cfg.KEK.Open(x.secretName(p, g), stored)
	if err != nil {
		return keys.Key{}, err
	}
	kept, err := keys.KeyFromBytes(plain)
	clear(plain)
	if err != nil {
		return keys.Key{}, err
	}
	x.mu.Lock()
	x.agreed[upKey{p, g}] = kept
	x.mu.Unlock()
	return kept, nil
}

// PairKey implements PairKeySource.
func (x *ExchangeSource) PairKey(ctx context.Context, p registry.Pair, g keys.Generation) (keys.Key, error) {
	i := x.cfg.Enclave
	if p.A == i && p.B == i {
		return keys.PairKey(&x.cfg.EnclaveKey, i, i, g)
	}
	if p.A != i && p.B != i {
		return keys.Key{}, status.Errorf(codes.PermissionDenied, "pair %s is not enclave %d's", p, i)
	}
	if k, ok, err := x.load(ctx, p, g); err != nil || ok {
		return k, err
	}
	other := p.A + p.B - i
	if i > other {
		return keys.Key{}, status.Errorf(codes.Unavailable, "EK(%s, generation %d) is not agreed yet: enclave %d's key server starts that exchange", p, g, other)
	}
	return x.initiate(ctx, p, g, other)
}

// initiate runs the exchange as the lower enclave: it reads the peer key
// server's certificate (verified against the org root), sends a signed
// offer, checks the signed answer, and keeps the agreed key.
func (x *ExchangeSource) initiate(ctx context.Context, p registry.Pair, g keys.Generation, other keys.EnclaveID) (keys.Key, error) {
	x.mu.Lock()
	lock := x.busy[upKey{p, g}]
	if lock == nil {
		lock = &sync.Mutex{}
		x.busy[upKey{p, g}] = lock
	}
	x.mu.Unlock()
	lock.Lock()
	defer lock.Unlock()
	if k, ok, err := x.load(ctx, p, g); err != nil || ok {
		return k, err
	}
	ctx, cancel := context.WithTimeout(ctx, exchangeTimeout)
	defer cancel()
	addr, ok := x.cfg.Peers[other]
	if !ok {
		return keys.Key{}, status.Errorf(codes.Unavailable, "no address for enclave %d's key server (--peer %d=ADDR)", other, other)
	}
	peerPub, err := x.peerKey(ctx, addr, other)
	if err != nil {
		return keys.Key{}, status.Errorf(codes.Unavailable, "enclave %d's key server: %v", other, err)
	}
	self := keys.ExchangeIdentity{Enclave: x.cfg.Enclave, Signer: x.signer}
	pending, offer, err := keys.StartExchange(self, keys.ExchangePeer{Enclave: other, PublicKey: peerPub}, g)
	if err != nil {
		return keys.Key{}, status.Errorf(codes.Internal, "exchange: %v", err)
	}
	conn, err := Dial(addr, "", x.cfg.Creds)
	if err != nil {
		return keys.Key{}, status.Errorf(codes.Unavailable, "enclave %d's key server: %v", other, err)
	}
	defer conn.Close()
	reply, err := api.NewPairExchangeClient(conn).Exchange(ctx, &api.ExchangeRequest{Pair: apiPair(p), Generation: uint32(g), Offer: offer})
	if err != nil {
		return keys.Key{}, status.Errorf(codes.Unavailable, "enclave %d's key server refused the exchange: %v", other, status.Convert(err).Message())
	}
	ek, err := pending.Finish(reply.GetAnswer())
	if err != nil {
		return keys.Key{}, status.Errorf(codes.Unavailable, "exchange with enclave %d: %v", other, err)
	}
	x.cfg.Log.Info("pair key agreed", "pair", p.String(), "generation", g, "role", "initiator")
	return x.save(ctx, p, g, ek)
}

// peerKey reads the public key of the key server at addr from its TLS
// certificate, which must be a keyserver certificate of enclave want.
func (x *ExchangeSource) peerKey(ctx context.Context, addr string, want keys.EnclaveID) (ed25519.PublicKey, error) {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, err
	}
	d := tls.Dialer{Config: x.cfg.Creds.ClientTLS(host)}
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	certs := c.(*tls.Conn).ConnectionState().PeerCertificates
	if len(certs) == 0 {
		return nil, fmt.Errorf("no certificate")
	}
	id, err := ca.IdentityOf(certs[0])
	if err != nil {
		return nil, err
	}
	if id.Role != ca.RoleKeyserver || id.Enclave != want {
		return nil, fmt.Errorf("%s is not the key server of enclave %d", id, want)
	}
	pub, ok := certs[0].PublicKey.(ed25519.PublicKey)
	if !ok {
		return nil, fmt.Errorf("%s has no Ed25519 key", id)
	}
	return pub, nil
}

// Sync starts the exchanges this key server owes: for every allowed pair
// with a higher enclave, every accepted generation not yet agreed. Failures
// are logged and retried at the next change.
func (x *ExchangeSource) Sync(ctx context.Context, st *registry.State) {
	now := x.cfg.Clock.Now()
	for _, p := range st.PairsOf(x.cfg.Enclave) {
		if p.A != x.cfg.Enclave || p.A == p.B {
			continue // the lower enclave starts; E_i covers (i, i)
		}
		gs, ok := st.Generation(p)
		if !ok {
			continue
		}
		for _, g := range gs.Accepted(now) {
			if _, err := x.PairKey(ctx, p, g); err != nil {
				x.cfg.Log.Warn("pair key exchange pending", "pair", p.String(), "generation", g, "err", err)
			}
		}
	}
}

// Exchange implements api.PairExchangeServer: the answering side.
func (s *Service) Exchange(ctx context.Context, req *api.ExchangeRequest) (*api.ExchangeReply, error) {
	const rpc = "Exchange"
	c, err := s.authorize(ctx, rpc, ca.RoleKeyserver)
	if err != nil {
		return nil, err
	}
	x, ok := s.pairKeys.(*ExchangeSource)
	if !ok {
		return nil, s.refuse(c, rpc, codes.FailedPrecondition, "this key server holds no enclave key (not in enclave-key mode)")
	}
	i, j := x.cfg.Enclave, c.device.Enclave
	ps, err := checkPairs([]*api.Pair{req.GetPair()})
	if err != nil {
		return nil, s.refuse(c, rpc, codes.InvalidArgument, err.Error())
	}
	p, g := ps[0], keys.Generation(req.GetGeneration())
	ids := &audit.IDs{Enclave: uint16(p.A), Peer: uint16(p.B)}
	gg := uint32(g)
	switch {
	case j == 0 || j == i || p != registry.NewPair(i, j):
		return nil, s.refuse(c, rpc, codes.PermissionDenied, fmt.Sprintf("%s is not the key server of the other enclave of pair %s", c.id, p))
	case j > i:
		return nil, s.refuse(c, rpc, codes.FailedPrecondition, "the key server of the lower enclave id starts the exchange")
	case c.state.Top(p) != p:
		return nil, s.refuse(c, rpc, codes.InvalidArgument, fmt.Sprintf("pair %s is not a level-1 pair: pair keys are exchanged for level-1 pairs only (DESIGN §3a)", c.state.PairName(p)))
	case !c.state.Readable(p):
		return nil, s.refuse(c, rpc, codes.PermissionDenied, fmt.Sprintf("pair %s is not allowed to talk, nor any pair beneath it", c.state.PairName(p)))
	}
	gs, _ := c.state.Generation(p)
	if !containsGen(gs.Accepted(s.clock.Now()), g) {
		return nil, s.refuse(c, rpc, codes.FailedPrecondition, fmt.Sprintf("generation %d of pair %s is not accepted now (current %d)", g, p, gs.Current))
	}
	if _, done, err := x.load(ctx, p, g); err != nil || done {
		if err == nil {
			err = status.Errorf(codes.AlreadyExists, "EK(%s, generation %d) was already agreed", p, g)
		}
		s.deny(c, rpc, "pair", ids, err.Error())
		return nil, err
	}
	pub, err := callerKey(ctx)
	if err != nil {
		return nil, s.refuse(c, rpc, codes.Unauthenticated, err.Error())
	}
	self := keys.ExchangeIdentity{Enclave: i, Signer: x.signer}
	answer, ek, err := keys.AnswerExchange(self, keys.ExchangePeer{Enclave: j, PublicKey: pub}, g, req.GetOffer())
	if err != nil {
		return nil, s.refuse(c, rpc, codes.InvalidArgument, err.Error())
	}
	if kept, err := x.save(ctx, p, g, ek); err != nil || !kept.Equal(&ek) {
		return nil, s.refuse(c, rpc, codes.AlreadyExists, "a key for this pair and generation was agreed meanwhile")
	}
	if err := s.record(c, rpc, audit.Entry{Level: "pair", IDs: ids, Generation: &gg, Decision: audit.Allow, Reason: "pair key agreed by exchange"}); err != nil {
		return nil, err
	}
	x.cfg.Log.Info("pair key agreed", "pair", p.String(), "generation", g, "role", "responder")
	return &api.ExchangeReply{Answer: answer}, nil
}

func containsGen(gs []keys.Generation, g keys.Generation) bool {
	for _, x := range gs {
		if x == g {
			return true
		}
	}
	return false
}

// callerKey is the Ed25519 public key of the request's client certificate.
func callerKey(ctx context.Context) (ed25519.PublicKey, error) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return nil, fmt.Errorf("no peer")
	}
	info, ok := p.AuthInfo.(credentials.TLSInfo)
	if !ok || len(info.State.PeerCertificates) == 0 {
		return nil, fmt.Errorf("no client certificate")
	}
	pub, ok := info.State.PeerCertificates[0].PublicKey.(ed25519.PublicKey)
	if !ok {
		return nil, fmt.Errorf("client certificate has no Ed25519 key")
	}
	return pub, nil
}

// exchangeTimeout bounds one exchange.
const exchangeTimeout = 10 * time.Second
