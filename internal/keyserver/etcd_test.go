package keyserver

import (
	"bytes"
	"cmp"
	"context"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/enclavekeys/enclave/internal/api"
	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/etcdtest"
	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/store"
)

// TestEtcdReplicas: two key-server replicas over a 3-member etcd cluster
// serve one organisation consistently: an admin write through one is seen
// by the other at once, a rotation made through one reaches watchers of the
// other, both agree on every key, and they keep answering after the
// cluster loses a member. The audit log in etcd verifies.
func TestEtcdReplicas(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a 3-member etcd cluster")
	}
	cluster := etcdtest.Start(t, 3)
	clock := &fakeClock{now: t0}
	auth, err := ca.Init(filepath.Join(t.TempDir(), "ca"), "example.org", t0)
	if err != nil {
		t.Fatal(err)
	}
	var replicas []*lab
	var logs []*store.EtcdAudit
	for i := 0; i < 2; i++ {
		es, err := store.OpenEtcd(cluster.Endpoints, "", testKEK(t))
		if err != nil {
			t.Fatal(err)
		}
		al := store.NewEtcdAudit(es, clock.Now)
		logs = append(logs, al)
		replicas = append(replicas, startLab(t, auth, clock, es, al, nil))
	}
	a, b := replicas[0], replicas[1]
	if !a.orgKey.Equal(&b.orgKey) {
		t.Fatal("replicas hold different org keys")
	}
	setup(t, a) // every admin write goes through replica A
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	// Replica B serves what was written through A.
	ka, err := a.client(idServer).GetServerKeys(ctx, &api.GetServerKeysRequest{})
	if err != nil {
		t.Fatal(err)
	}
	kb, err := b.client(idServer).GetServerKeys(ctx, &api.GetServerKeysRequest{})
	if err != nil || len(kb.Keys) != 1 || !bytes.Equal(ka.Keys[0].Key, kb.Keys[0].Key) {
		t.Fatalf("replica B: %v %+v", err, kb)
	}
	// Both replicas lease SPIs of one server key at once: the store hands
	// out every counter value once (compare-and-swap on the registry).
	var mu sync.Mutex
	var ranges [][2]uint64
	var wg sync.WaitGroup
	for _, r := range replicas {
		cl := r.client(idServer)
		wg.Go(func() {
			for range 10 {
				l, err := cl.LeaseSPIs(ctx, &api.LeaseSPIsRequest{Peer: 7, Generation: 1, Count: 100})
				if err != nil {
					t.Error(err)
					return
				}
				mu.Lock()
				ranges = append(ranges, [2]uint64{l.First, l.First + uint64(l.Count)})
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	slices.SortFunc(ranges, func(x, y [2]uint64) int { return cmp.Compare(x[0], y[0]) })
	for k := 1; k < len(ranges); k++ {
		if ranges[k][0] < ranges[k-1][1] {
			t.Fatalf("replicas leased overlapping ranges %v and %v", ranges[k-1], ranges[k])
		}
	}
	if len(ranges) != 20 {
		t.Fatalf("%d leases of 20", len(ranges))
	}
	// A watcher on B hears of a rotation made through A.
	stream, err := b.client(idGateway).WatchGenerations(ctx, &api.WatchGenerationsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if ev, err := stream.Recv(); err != nil || ev.Kind != api.GenerationEvent_SNAPSHOT {
		t.Fatalf("snapshot: %v %v", ev, err)
	}
	if ev, err := stream.Recv(); err != nil || ev.Kind != api.GenerationEvent_SNAPSHOT_DONE {
		t.Fatalf("snapshot done: %v %v", ev, err)
	}
	clock.Advance(2 * time.Hour)
	if r, err := a.client(idAdmin).Rotate(ctx, &api.RotateRequest{Pair: &api.Pair{A: 3, B: 7}}); err != nil || r.Rotations[0].Outcome != "rotated" {
		t.Fatalf("rotate through A: %v %+v", err, r)
	}
	ev, err := stream.Recv()
	if err != nil || ev.Kind != api.GenerationEvent_ROTATED || ev.Generation != 2 || ev.Reason != "admin rotate" {
		t.Fatalf("watcher on B: %+v %v", ev, err)
	}
	// A revocation through A is refused by B at once.
	if _, err := a.client(idAdmin).RevokeDevice(ctx, &api.RevokeDeviceRequest{Name: "db1"}); err != nil {
		t.Fatal(err)
	}
	if _, err := b.client(idServer2).GetServerKeys(ctx, &api.GetServerKeysRequest{}); err == nil {
		t.Fatal("replica B served a device revoked through A")
	}
	// The cluster loses a member; both replicas keep answering.
	cluster.StopMember(0)
	for _, r := range replicas {
		if _, err := r.client(idServer).GetServerKeys(ctx, &api.GetServerKeysRequest{}); err != nil {
			t.Fatalf("after losing a member: %v", err)
		}
	}
	if _, err := b.client(idAdmin).AddEnclave(ctx, &api.AddEnclaveRequest{Id: 11, Name: "after"}); err != nil {
		t.Fatalf("admin write after losing a member: %v", err)
	}
	res, err := logs[1].Verify(ctx)
	if err != nil || res.Entries < 20 {
		t.Fatalf("etcd audit: %+v %v", res, err)
	}
}

// TestEnclaveTier: an enclave key server for enclave 3 holds no org key; it
// fetches EK(3,·) from the org tier over mTLS and serves its servers the
// same SKs the org key gives, refuses servers of other enclaves and admin
// changes, and never serves pairs outside its enclave.
func TestEnclaveTier(t *testing.T) {
	cluster, clock, auth := etcdOrg(t)
	open := func() (*store.Etcd, *store.EtcdAudit) { return etcdStore(t, cluster, clock) }
	es, al := open()
	org := startLab(t, auth, clock, es, al, func(c *Config) { c.Tier = TierOrg })
	setup(t, org)
	ks3 := credsFrom(t, auth, idEncKS, t0)
	conn, err := Dial(org.addr, "127.0.0.1", ks3)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	es2, al2 := open()
	enc := startLab(t, auth, clock, es2, al2, func(c *Config) {
		c.Tier, c.Enclave, c.PairKeys = TierEnclave, 3, NewUpstream(conn, clock.Now)
	})
	if enc.orgKey != (keys.Key{}) {
		t.Fatal("the enclave tier holds an org key")
	}
	ctx := context.Background()
	got, err := enc.client(idServer).GetServerKeys(ctx, &api.GetServerKeysRequest{})
	if err != nil || len(got.Keys) != 1 {
		t.Fatalf("enclave tier: %v %+v", err, got)
	}
	ek, _ := keys.PairKey(&org.orgKey, 3, 7, 1)
	want, _ := keys.ServerKey(&ek, keys.VC{Enclave: 3, Peer: 7, Server: 258})
	if !bytes.Equal(got.Keys[0].Key, want[:]) {
		t.Fatal("the enclave tier's SK differs from the org key's")
	}
	if _, err := org.client(idServer).GetServerKeys(ctx, &api.GetServerKeysRequest{}); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("org tier serving a server: %v", err)
	}
	if _, err := enc.client(idServer2).GetServerKeys(ctx, &api.GetServerKeysRequest{}); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("server of enclave 7 at enclave 3's tier: %v", err)
	}
	if _, err := enc.client(idAdmin).AddEnclave(ctx, &api.AddEnclaveRequest{Id: 12, Name: "x"}); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("admin at the enclave tier: %v", err)
	}
	// The enclave tier itself may not fetch pairs beyond its enclave.
	if _, err := api.NewKeyServiceClient(conn).GetPairKeys(ctx, &api.GetPairKeysRequest{Pairs: []*api.Pair{{A: 7, B: 9}}}); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("enclave tier asking for pair 7-9: %v", err)
	}
}

// etcdOrg is a one-member etcd cluster, the fake clock and a CA, for key
// servers sharing a registry in etcd.
func etcdOrg(t *testing.T) (*etcdtest.Cluster, *fakeClock, *ca.Authority) {
	t.Helper()
	cluster := etcdtest.Start(t, 1)
	clock := &fakeClock{now: t0}
	auth, err := ca.Init(filepath.Join(t.TempDir(), "ca"), "example.org", t0)
	if err != nil {
		t.Fatal(err)
	}
	return cluster, clock, auth
}

// etcdStore opens the cluster's registry and audit log, as a replica does.
func etcdStore(t *testing.T, cluster *etcdtest.Cluster, clock *fakeClock) (*store.Etcd, *store.EtcdAudit) {
	t.Helper()
	es, err := store.OpenEtcd(cluster.Endpoints, "", testKEK(t))
	if err != nil {
		t.Fatal(err)
	}
	return es, store.NewEtcdAudit(es, clock.Now)
}
