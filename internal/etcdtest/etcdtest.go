// Package etcdtest runs real embedded etcd members on loopback for tests:
// one, or a cluster of several that can lose a member.
package etcdtest

import (
	"fmt"
	"net"
	"net/url"
	"strings"
	"testing"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
)

// Cluster is a running etcd cluster.
type Cluster struct {
	Members   []*embed.Etcd
	Endpoints []string
}

func freePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// Start runs an n-member cluster on loopback and waits until it has a
// leader. It is stopped when the test ends.
func Start(t testing.TB, n int) *Cluster {
	t.Helper()
	type urls struct{ peer, client url.URL }
	us := make([]urls, n)
	var initial []string
	for i := range us {
		us[i] = urls{
			peer:   url.URL{Scheme: "http", Host: fmt.Sprintf("127.0.0.1:%d", freePort(t))},
			client: url.URL{Scheme: "http", Host: fmt.Sprintf("127.0.0.1:%d", freePort(t))},
		}
		initial = append(initial, fmt.Sprintf("m%d=%s", i, us[i].peer.String()))
	}
	c := &Cluster{}
	for i := range us {
		cfg := embed.NewConfig()
		cfg.Name = fmt.Sprintf("m%d", i)
		cfg.Dir = t.TempDir()
		cfg.ListenPeerUrls = []url.URL{us[i].peer}
		cfg.AdvertisePeerUrls = []url.URL{us[i].peer}
		cfg.ListenClientUrls = []url.URL{us[i].client}
		cfg.AdvertiseClientUrls = []url.URL{us[i].client}
		cfg.InitialCluster = strings.Join(initial, ",")
		cfg.InitialClusterToken = "enclave-test"
		cfg.ClusterState = embed.ClusterStateFlagNew
		cfg.LogLevel = "error"
		// etcd logs expected shutdown errors loudly; tests read their
		// own assertions, not etcd's logs.
		cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop())
		e, err := embed.StartEtcd(cfg)
		if err != nil {
			c.Stop()
			t.Fatalf("etcd member %d: %v", i, err)
		}
		c.Members = append(c.Members, e)
		c.Endpoints = append(c.Endpoints, us[i].client.String())
	}
	t.Cleanup(c.Stop)
	for i, e := range c.Members {
		select {
		case <-e.Server.ReadyNotify():
		case <-time.After(30 * time.Second):
			t.Fatalf("etcd member %d not ready", i)
		}
	}
	return c
}

// StopMember stops member i (the cluster keeps quorum if enough remain).
func (c *Cluster) StopMember(i int) {
	if c.Members[i] != nil {
		c.Members[i].Close()
		c.Members[i] = nil
	}
}

// Stop stops every member.
func (c *Cluster) Stop() {
	for i := range c.Members {
		c.StopMember(i)
	}
}
