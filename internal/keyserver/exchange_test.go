package keyserver

import (
	"bytes"
	"context"
	"crypto/rand"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/enclavekeys/enclave/internal/api"
	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/etcdtest"
	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/registry"
	"github.com/enclavekeys/enclave/internal/store"
)

// TestEnclaveKeyMode: two enclave key servers without an org key agree on
// EK(3,7,g) by exchange; each serves its servers SKs under the same EK;
// EK(3,3,g) comes from E_3; a new generation runs a new exchange; an outside
// key server cannot take part.
func TestEnclaveKeyMode(t *testing.T) {
	cluster, clock, auth := etcdOrg(t)
	sources, labs := keyModePair(t, cluster, auth, clock, 3, 7, "3", "7")
	ctx := context.Background()
	admin := labs[3].client(idAdmin)
	register(t, admin,
		[]*api.AddEnclaveRequest{{Id: 3, Name: "web"}, {Id: 7, Name: "db"}, {Id: 9, Name: "lab"}},
		[]*api.AddDeviceRequest{
			{Name: "web1", Role: "server", Enclave: 3, ServerId: u32(258)},
			{Name: "db1", Role: "server", Enclave: 7, ServerId: u32(9)},
			{Name: "ks3", Role: "keyserver", Enclave: 3},
			{Name: "ks7", Role: "keyserver", Enclave: 7},
			{Name: "ks9", Role: "keyserver", Enclave: 9},
		},
		[]*api.AllowPairRequest{{A: 3, B: 7}, {A: 3, B: 3}})
	// Enclave 3's key server serves web1 (starting the exchange if its
	// watcher has not yet); enclave 7's serves db1 from the agreed key.
	k3, err := labs[3].client(idServer).GetServerKeys(ctx, &api.GetServerKeysRequest{})
	if err != nil || len(k3.Keys) != 2 {
		t.Fatalf("enclave 3: %v %+v", err, k3)
	}
	var k7 *api.ServerKeys
	for try := 0; try < 50; try++ {
		if k7, err = labs[7].client(idServer2).GetServerKeys(ctx, &api.GetServerKeysRequest{}); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil || len(k7.Keys) != 1 {
		t.Fatalf("enclave 7: %v %+v", err, k7)
	}
	p := registry.NewPair(3, 7)
	ek3, ok3, _ := sources[3].load(ctx, p, 1)
	ek7, ok7, _ := sources[7].load(ctx, p, 1)
	if !ok3 || !ok7 || !ek3.Equal(&ek7) {
		t.Fatal("the two key servers hold different EK(3,7,1)")
	}
	for _, k := range append(k3.Keys, k7.Keys...) {
		var ek keys.Key
		if k.Peer == k.Enclave {
			ek, _ = keys.PairKey(&sources[3].cfg.EnclaveKey, 3, 3, 1)
		} else {
			ek = ek3
		}
		want, _ := keys.ServerKey(&ek, keys.VC{Enclave: keys.EnclaveID(k.Enclave), Peer: keys.EnclaveID(k.Peer), Server: keys.ServerID(k.Server)})
		if !bytes.Equal(k.Key, want[:]) {
			t.Fatalf("SK(%d,%d,%d) is not derived from the agreed pair key", k.Enclave, k.Peer, k.Server)
		}
	}
	// A new generation runs a new exchange.
	clock.Advance(2 * time.Hour)
	if _, err := admin.Rotate(ctx, &api.RotateRequest{Pair: &api.Pair{A: 3, B: 7}}); err != nil {
		t.Fatal(err)
	}
	var ek2 keys.Key
	for try := 0; try < 100; try++ {
		if k, ok, _ := sources[7].load(ctx, p, 2); ok {
			ek2 = k
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if ek2 == (keys.Key{}) || ek2.Equal(&ek3) {
		t.Fatal("generation 2 did not run a new exchange")
	}
	// An outsider key server (enclave 9) cannot answer or start for 3-7.
	conn, err := Dial(labs[7].addr, "127.0.0.1", credsFrom(t, auth, ca.Identity{Name: "ks9", Role: ca.RoleKeyserver, Enclave: 9}, t0))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_, err = api.NewPairExchangeClient(conn).Exchange(ctx, &api.ExchangeRequest{Pair: &api.Pair{A: 3, B: 7}, Generation: 2, Offer: []byte("x")})
	if status.Code(err) != codes.PermissionDenied {
		t.Fatalf("outsider exchange: %v", err)
	}
	// The higher enclave may not start, and a generation is agreed once.
	conn3, _ := Dial(labs[3].addr, "127.0.0.1", credsFrom(t, auth, ca.Identity{Name: "ks7", Role: ca.RoleKeyserver, Enclave: 7}, t0))
	defer conn3.Close()
	if _, err := api.NewPairExchangeClient(conn3).Exchange(ctx, &api.ExchangeRequest{Pair: &api.Pair{A: 3, B: 7}, Generation: 2, Offer: []byte("x")}); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("higher enclave starting: %v", err)
	}
	conn7, _ := Dial(labs[7].addr, "127.0.0.1", credsFrom(t, auth, ca.Identity{Name: "ks3", Role: ca.RoleKeyserver, Enclave: 3}, t0))
	defer conn7.Close()
	if _, err := api.NewPairExchangeClient(conn7).Exchange(ctx, &api.ExchangeRequest{Pair: &api.Pair{A: 3, B: 7}, Generation: 2, Offer: []byte("x")}); status.Code(err) != codes.AlreadyExists {
		t.Fatalf("second exchange for generation 2: %v", err)
	}
}

// keyModePair starts enclave-key-mode key servers of enclaves a and b
// (named ks+an, ks+bn) over one etcd, each with a random enclave key and
// the other as its exchange peer.
func keyModePair(t *testing.T, cluster *etcdtest.Cluster, auth *ca.Authority, clock *fakeClock, a, b keys.EnclaveID, an, bn string) (map[keys.EnclaveID]*ExchangeSource, map[keys.EnclaveID]*lab) {
	t.Helper()
	kek, _ := store.NewKEK(bytes.Repeat([]byte{7}, 32))
	peers := map[keys.EnclaveID]map[keys.EnclaveID]string{a: {}, b: {}}
	sources := map[keys.EnclaveID]*ExchangeSource{}
	labs := map[keys.EnclaveID]*lab{}
	for _, e := range []keys.EnclaveID{a, b} {
		es, err := store.OpenEtcd(cluster.Endpoints, "", kek)
		if err != nil {
			t.Fatal(err)
		}
		creds := credsFrom(t, auth, ca.Identity{Name: "ks" + map[keys.EnclaveID]string{a: an, b: bn}[e], Role: ca.RoleKeyserver, Enclave: e}, t0, "127.0.0.1")
		var ei keys.Key
		rand.Read(ei[:])
		src, err := NewExchangeSource(ExchangeConfig{Enclave: e, EnclaveKey: ei, Creds: creds, Peers: peers[e], Store: es, KEK: kek, Clock: clock})
		if err != nil {
			t.Fatal(err)
		}
		sources[e] = src
		labs[e] = startLabAs(t, auth, clock, es, store.NewEtcdAudit(es, clock.Now), func(c *Config) {
			c.Tier, c.Enclave, c.PairKeys = TierEnclave, e, src
		}, creds)
	}
	peers[a][b], peers[b][a] = labs[b].addr, labs[a].addr
	return sources, labs
}
