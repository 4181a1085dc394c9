package keyserver

import (
	"bytes"
	"context"
	"errors"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/enclavekeys/enclave/internal/api"
	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/registry"
	"github.com/enclavekeys/enclave/internal/store"
)

// TestSubEnclaveKeys: an org of layout 8.8 (DESIGN §3a). A server of
// sub-enclave 3.1 gets a server key towards each sub-enclave it may talk
// to, derived through EK_2; a gateway granted 3.1-7.2 gets EK_2 of that
// sub-pair only, one granted 3-7 and a monitor EK_1; a forbidden sub-pair
// gives its servers no key; the layout stays what the org was created
// with.
func TestSubEnclaveKeys(t *testing.T) {
	l := newLab(t)
	ctx := context.Background()
	lay, _ := keys.ParseLayout("8.8")
	if err := l.svc.SetLayout(ctx, lay); err != nil {
		t.Fatal(err)
	}
	id := func(s string) keys.EnclaveID {
		v, err := lay.ParseID(s)
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	admin := l.client(idAdmin)
	register(t, admin,
		[]*api.AddEnclaveRequest{{Id: uint32(id("3")), Name: "corp"}, {Id: uint32(id("3.1")), Name: "web"}, {Id: uint32(id("3.2")), Name: "db"},
			{Id: uint32(id("7")), Name: "fin"}, {Id: uint32(id("7.1")), Name: "ledger"}, {Id: uint32(id("7.2")), Name: "pay"}},
		[]*api.AddDeviceRequest{
			{Name: "web1", Role: "server", Enclave: uint32(id("3.1")), ServerId: u32(31)},
			{Name: "gw", Role: "gateway"}, {Name: "gw2", Role: "gateway"}, {Name: "ids", Role: "monitor"},
		},
		[]*api.AllowPairRequest{{A: uint32(id("3")), B: uint32(id("7"))}})
	if _, err := admin.ForbidPair(ctx, &api.ForbidPairRequest{A: uint32(id("3.1")), B: uint32(id("7.1"))}); err != nil {
		t.Fatal(err)
	}
	for _, g := range []*api.AddGrantRequest{
		{Device: "gw", Pairs: []*api.Pair{{A: uint32(id("3.1")), B: uint32(id("7.2"))}}},
		{Device: "gw2", Pairs: []*api.Pair{{A: uint32(id("3")), B: uint32(id("7"))}}},
		{Device: "ids", All: true},
	} {
		if _, err := admin.AddGrant(ctx, g); err != nil {
			t.Fatal(err)
		}
	}
	if r, err := admin.Layout(ctx, &api.LayoutRequest{}); err != nil || r.GetLayout() != "8.8" {
		t.Fatalf("layout %q, %v", r.GetLayout(), err)
	}

	web1 := ca.Identity{Name: "web1", Role: ca.RoleServer, Enclave: id("3.1"), ServerID: 31, HasServerID: true}
	sk, err := l.client(web1).GetServerKeys(ctx, &api.GetServerKeysRequest{})
	if err != nil {
		t.Fatal(err)
	}
	peers := map[keys.EnclaveID]bool{}
	for _, k := range sk.Keys {
		vc := keys.VC{Enclave: id("3.1"), Peer: keys.EnclaveID(k.Peer), Server: 31}
		want, _ := keys.ServerKeyAt(&l.orgKey, lay, vc, keys.Generation(k.Validity.Generation))
		if !bytes.Equal(k.Key, want[:]) {
			t.Fatalf("SK(3.1,%s,31) is not DESIGN §3a's", lay.Short(vc.Peer))
		}
		peers[vc.Peer] = true
	}
	if len(peers) != 2 || !peers[id("7")] || !peers[id("7.2")] {
		t.Fatalf("web1's peers %v: want 7 and 7.2 (7.1 forbidden)", peers)
	}

	for _, c := range []struct {
		who   ca.Identity
		pair  [2]keys.EnclaveID
		level uint32
	}{
		{idGateway, [2]keys.EnclaveID{id("3.1"), id("7.2")}, 2},
		{ca.Identity{Name: "gw2", Role: ca.RoleGateway}, [2]keys.EnclaveID{id("3"), id("7")}, 1},
		{idMonitor, [2]keys.EnclaveID{id("3"), id("7")}, 1},
	} {
		pk, err := l.client(c.who).GetPairKeys(ctx, &api.GetPairKeysRequest{})
		if err != nil {
			t.Fatal(err)
		}
		if pk.GetLayout() != "8.8" || len(pk.Keys) != 1 {
			t.Fatalf("%s: layout %q, %d keys", c.who.Name, pk.GetLayout(), len(pk.Keys))
		}
		k := pk.Keys[0]
		want, _ := keys.PairKeyAt(&l.orgKey, lay, int(c.level), c.pair[0], c.pair[1], keys.Generation(k.Validity.Generation))
		if k.Pair.A != uint32(c.pair[0]) || k.Pair.B != uint32(c.pair[1]) || k.Level != c.level || !bytes.Equal(k.Key, want[:]) {
			t.Fatalf("%s got pair %d-%d level %d, want EK_%d(%s-%s)", c.who.Name, k.Pair.A, k.Pair.B, k.Level, c.level, lay.Short(c.pair[0]), lay.Short(c.pair[1]))
		}
	}
	// Direct key exchange: a grant covers the SAs of the pairs beneath it;
	// a forbidden sub-pair's SAs are nobody's.
	for _, c := range []struct {
		gw   string
		peer string
		want bool
	}{{"gw2", "7.2", true}, {"gw", "7.2", true}, {"gw", "7", false}, {"gw2", "7.1", false}} {
		a, err := l.client(web1).AuthorizeDirectKeyExchange(ctx, &api.AuthorizeDirectKeyExchangeRequest{Enclave: uint32(id("3.1")), Peer: uint32(id(c.peer)), Gateway: c.gw})
		if err != nil || a.GetAllowed() != c.want {
			t.Fatalf("%s taking the keys of an SA of 3.1-%s: %v, %v; want %v", c.gw, c.peer, a.GetAllowed(), err, c.want)
		}
	}
	// The sibling sub-pair is not the gateway's to ask for.
	_, err = l.client(idGateway).GetPairKeys(ctx, &api.GetPairKeysRequest{Pairs: []*api.Pair{{A: uint32(id("3.2")), B: uint32(id("7.2"))}}})
	if status.Code(err) != codes.PermissionDenied {
		t.Fatalf("gateway asking for 3.2-7.2: %v", err)
	}
	// A sub-enclave of no enclave, and another layout, are refused.
	if _, err := admin.AddEnclave(ctx, &api.AddEnclaveRequest{Id: uint32(id("9.1")), Name: "orphan"}); status.Code(err) != codes.NotFound {
		t.Fatalf("sub-enclave 9.1 with no enclave 9: %v", err)
	}
	if err := l.svc.SetLayout(ctx, keys.Layout{}); !errors.Is(err, ErrLayoutMismatch) {
		t.Fatalf("another layout on an org with enclaves: %v", err)
	}
	if err := l.svc.SetLayout(ctx, lay); err != nil {
		t.Fatalf("the same layout again: %v", err)
	}
}

// TestSubEnclaveTier: an enclave tier of enclave 3 (pair keys from the
// org tier, no org key) serves the servers of its sub-enclaves, deriving
// the lower levels of DESIGN §3a from the EK_1 it fetches, and refuses
// those of another enclave.
func TestSubEnclaveTier(t *testing.T) {
	cluster, clock, auth := etcdOrg(t)
	open := func() (*store.Etcd, *store.EtcdAudit) { return etcdStore(t, cluster, clock) }
	es, al := open()
	org := startLab(t, auth, clock, es, al, func(c *Config) { c.Tier = TierOrg })
	ctx := context.Background()
	lay, _ := keys.ParseLayout("8.8")
	if err := org.svc.SetLayout(ctx, lay); err != nil {
		t.Fatal(err)
	}
	id := func(s string) keys.EnclaveID { v, _ := lay.ParseID(s); return v }
	register(t, org.client(idAdmin),
		[]*api.AddEnclaveRequest{{Id: uint32(id("3")), Name: "corp"}, {Id: uint32(id("3.1")), Name: "web"}, {Id: uint32(id("7")), Name: "fin"}},
		[]*api.AddDeviceRequest{
			{Name: "web1", Role: "server", Enclave: uint32(id("3.1")), ServerId: u32(31)},
			{Name: "fin1", Role: "server", Enclave: uint32(id("7")), ServerId: u32(71)},
			{Name: "ks3", Role: "keyserver", Enclave: uint32(id("3"))},
		},
		[]*api.AllowPairRequest{{A: uint32(id("3.1")), B: uint32(id("7"))}})
	conn, err := Dial(org.addr, "127.0.0.1", credsFrom(t, auth, ca.Identity{Name: "ks3", Role: ca.RoleKeyserver, Enclave: id("3")}, t0))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	es2, al2 := open()
	enc := startLab(t, auth, clock, es2, al2, func(c *Config) {
		c.Tier, c.Enclave, c.PairKeys = TierEnclave, id("3"), NewUpstream(conn, clock.Now)
	})
	web1 := ca.Identity{Name: "web1", Role: ca.RoleServer, Enclave: id("3.1"), ServerID: 31, HasServerID: true}
	got, err := enc.client(web1).GetServerKeys(ctx, &api.GetServerKeysRequest{})
	if err != nil || len(got.Keys) != 1 {
		t.Fatalf("the enclave tier serving a server of 3.1: %v %+v", err, got)
	}
	want, _ := keys.ServerKeyAt(&org.orgKey, lay, keys.VC{Enclave: id("3.1"), Peer: id("7"), Server: 31}, 1)
	if !bytes.Equal(got.Keys[0].Key, want[:]) {
		t.Fatal("the enclave tier's SK(3.1,7,31) differs from DESIGN §3a's")
	}
	fin1 := ca.Identity{Name: "fin1", Role: ca.RoleServer, Enclave: id("7"), ServerID: 71, HasServerID: true}
	if _, err := enc.client(fin1).GetServerKeys(ctx, &api.GetServerKeysRequest{}); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("a server of enclave 7 at enclave 3's tier: %v", err)
	}
}

// TestSubEnclaveKeyMode: in enclave-key mode (no org key) the level-1
// pair key comes from the exchange between enclave 3's and 7's key
// servers, and the lower levels of DESIGN §3a derive from it the same
// way: a server of 3.1 gets SK(3.1,7,k) under EK_2 of the agreed EK_1.
func TestSubEnclaveKeyMode(t *testing.T) {
	cluster, clock, auth := etcdOrg(t)
	lay, _ := keys.ParseLayout("8.8")
	id := func(s string) keys.EnclaveID { v, _ := lay.ParseID(s); return v }
	e3, e7 := id("3"), id("7")
	sources, labs := keyModePair(t, cluster, auth, clock, e3, e7, "3", "7")
	ctx := context.Background()
	if err := labs[e3].svc.SetLayout(ctx, lay); err != nil {
		t.Fatal(err)
	}
	register(t, labs[e3].client(idAdmin),
		[]*api.AddEnclaveRequest{{Id: uint32(e3), Name: "corp"}, {Id: uint32(id("3.1")), Name: "web"}, {Id: uint32(e7), Name: "fin"}},
		[]*api.AddDeviceRequest{
			{Name: "web1", Role: "server", Enclave: uint32(id("3.1")), ServerId: u32(31)},
			{Name: "ks3", Role: "keyserver", Enclave: uint32(e3)},
			{Name: "ks7", Role: "keyserver", Enclave: uint32(e7)},
		},
		[]*api.AllowPairRequest{{A: uint32(e3), B: uint32(e7)}})
	web1 := ca.Identity{Name: "web1", Role: ca.RoleServer, Enclave: id("3.1"), ServerID: 31, HasServerID: true}
	var got *api.ServerKeys
	var err error
	for try := 0; try < 50; try++ { // the exchange may still be under way
		if got, err = labs[e3].client(web1).GetServerKeys(ctx, &api.GetServerKeysRequest{}); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil || len(got.Keys) != 1 {
		t.Fatalf("web1's keys in enclave-key mode: %v %+v", err, got)
	}
	ek1, ok, _ := sources[e3].load(ctx, registry.NewPair(e3, e7), 1)
	if !ok {
		t.Fatal("no agreed EK_1(3,7,1)")
	}
	ek2, _ := keys.SubPairKey(&ek1, lay, 2, 2, id("3.1"), e7)
	want, _ := keys.ServerKey(&ek2, keys.VC{Enclave: id("3.1"), Peer: e7, Server: 31})
	if !bytes.Equal(got.Keys[0].Key, want[:]) {
		t.Fatal("SK(3.1,7,31) does not derive from the agreed EK_1 through EK_2")
	}
}
