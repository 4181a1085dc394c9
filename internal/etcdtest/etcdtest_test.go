package etcdtest

import (
	"fmt"
	"net/url"
	"testing"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
)

// TestStopMemberWithoutQuorum: a member of a three-member cluster whose
// peers never came is never ready; stopping it still returns (embed's
// Close alone waits for it forever).
func TestStopMemberWithoutQuorum(t *testing.T) {
	peers := make([]url.URL, 3)
	initial := ""
	for i := range peers {
		peers[i] = url.URL{Scheme: "http", Host: fmt.Sprintf("127.0.0.1:%d", freePort(t))}
		if i > 0 {
			initial += ","
		}
		initial += fmt.Sprintf("m%d=%s", i, peers[i].String())
	}
	cfg := embed.NewConfig()
	cfg.Name, cfg.Dir = "m0", t.TempDir()
	cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = peers[:1], peers[:1]
	client := url.URL{Scheme: "http", Host: fmt.Sprintf("127.0.0.1:%d", freePort(t))}
	cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{client}, []url.URL{client}
	cfg.InitialCluster, cfg.InitialClusterToken, cfg.ClusterState = initial, "enclave-test", embed.ClusterStateFlagNew
	cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop())
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-e.Server.ReadyNotify():
		t.Fatal("a member without quorum became ready")
	case <-time.After(500 * time.Millisecond):
	}
	c := &Cluster{Members: []*embed.Etcd{e}, t: t}
	start := time.Now()
	c.Stop()
	if took := time.Since(start); took > stopWait/2 {
		t.Fatalf("stopping took %v", took)
	}
}
