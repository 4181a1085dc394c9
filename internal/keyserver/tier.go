package keyserver

import (
	"context"
	"fmt"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/enclavekeys/enclave/internal/api"
	"github.com/enclavekeys/enclave/internal/echo"
	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/registry"
)

// Tier says which part of the key hierarchy a key server serves (DESIGN §6).
type Tier string

// The tiers.
const (
	// TierBoth holds the org key and serves every device: the one-process
	// deployment.
	TierBoth Tier = "both"
	// TierOrg holds the org key and serves pair keys (gateways, monitors,
	// enclave tiers); servers are served by their enclave tier.
	TierOrg Tier = "org"
	// TierEnclave serves the servers of one enclave. It holds no org key:
	// it fetches its enclave's pair keys from the org tier over mTLS and
	// derives server keys itself.
	TierEnclave Tier = "enclave"
)

// ParseTier parses a tier name.
func ParseTier(s string) (Tier, error) {
	switch Tier(s) {
	case TierBoth, TierOrg, TierEnclave:
		return Tier(s), nil
	}
	return "", fmt.Errorf("keyserver: tier %q: want org, enclave or both", echo.Cut(s))
}

// PairKeySource supplies EK(a,b,g).
type PairKeySource interface {
	PairKey(ctx context.Context, p registry.Pair, g keys.Generation) (keys.Key, error)
}

// orgSource derives pair keys from the org key.
type orgSource struct{ ok *keys.Key }

func (o orgSource) PairKey(_ context.Context, p registry.Pair, g keys.Generation) (keys.Key, error) {
	return keys.PairKey(o.ok, p.A, p.B, g)
}

// Upstream is an enclave tier's source of pair keys: the org tier, asked
// over mutual TLS with the enclave key server's own certificate. Keys are
// cached until their validity ends.
type Upstream struct {
	client api.KeyServiceClient
	now    func() time.Time
	mu     sync.Mutex
	cache  map[upKey]upEntry
}

type upKey struct {
	p registry.Pair
	g keys.Generation
}

type upEntry struct {
	key   keys.Key
	until time.Time
}

// NewUpstream uses conn, a connection to the org tier.
func NewUpstream(conn grpc.ClientConnInterface, now func() time.Time) *Upstream {
	if now == nil {
		now = time.Now
	}
	return &Upstream{client: api.NewKeyServiceClient(conn), now: now, cache: map[upKey]upEntry{}}
}

// PairKey implements PairKeySource.
func (u *Upstream) PairKey(ctx context.Context, p registry.Pair, g keys.Generation) (keys.Key, error) {
	u.mu.Lock()
	e, ok := u.cache[upKey{p, g}]
	u.mu.Unlock()
	if ok && u.now().Before(e.until) {
		return e.key, nil
	}
	resp, err := u.client.GetPairKeys(ctx, &api.GetPairKeysRequest{Pairs: []*api.Pair{{A: uint32(p.A), B: uint32(p.B)}}})
	if err != nil {
		return keys.Key{}, status.Errorf(codes.Unavailable, "org tier: %v", status.Convert(err).Message())
	}
	var found *keys.Key
	u.mu.Lock()
	defer u.mu.Unlock()
	now := u.now()
	for k, e := range u.cache { // retired generations: forget them
		if !now.Before(e.until) {
			delete(u.cache, k)
		}
	}
	for _, pk := range resp.GetKeys() {
		k, err := keys.KeyFromBytes(pk.GetKey())
		clear(pk.GetKey())
		if err != nil {
			continue
		}
		kg := keys.Generation(pk.GetValidity().GetGeneration())
		u.cache[upKey{p, kg}] = upEntry{k, pk.GetValidity().GetValidUntil().AsTime()}
		if kg == g {
			kk := k
			found = &kk
		}
	}
	if found == nil {
		return keys.Key{}, status.Errorf(codes.Unavailable, "org tier did not serve EK(%s, generation %d)", p, g)
	}
	return *found, nil
}
