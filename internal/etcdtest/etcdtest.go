// Package etcdtest runs real embedded etcd members on loopback for tests:
// one, or a cluster of several that can lose a member.
package etcdtest

import (
	"errors"
	"fmt"
	"net"
	"net/url"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
)

// Cluster is a running etcd cluster.
type Cluster struct {
	Members   []*embed.Etcd
	Endpoints []string
	t         testing.TB
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
//
// Its ports are picked free and then bound by etcd, so another test may
// take one in between: a member that finds its port taken makes Start
// try again on new ports (three times).
func Start(t testing.TB, n int) *Cluster {
	t.Helper()
	for try := 1; ; try++ {
		c, err := start(t, n)
		if err == nil {
			t.Cleanup(c.Stop)
			return c
		}
		if !errors.Is(err, syscall.EADDRINUSE) || try == 3 {
			t.Fatal(err)
		}
	}
}

func start(t testing.TB, n int) (*Cluster, error) {
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
	c := &Cluster{t: t}
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
			return nil, fmt.Errorf("etcd member %d: %w", i, err)
		}
		c.Members = append(c.Members, e)
		c.Endpoints = append(c.Endpoints, us[i].client.String())
	}
	for i, e := range c.Members {
		select {
		case <-e.Server.ReadyNotify():
		case <-time.After(30 * time.Second):
			c.Stop()
			return nil, fmt.Errorf("etcd member %d not ready in 30 s", i)
		}
	}
	return c, nil
}

// stopWait bounds how long a member may take to stop.
const stopWait = 30 * time.Second

// StopMember stops member i (the cluster keeps quorum if enough remain).
//
// A member that never became ready (its peers are gone, or never came)
// blocks in embed's Close: Close waits for the member's client servers,
// which start only once it is ready or stopping. Stopping the server
// first lets them return; and a member that still does not stop fails
// the test rather than hanging it.
func (c *Cluster) StopMember(i int) {
	e := c.Members[i]
	if e == nil {
		return
	}
	c.Members[i] = nil
	done := make(chan struct{})
	go func() {
		defer close(done)
		e.Server.Stop()
		e.Close()
	}()
	select {
	case <-done:
	case <-time.After(stopWait):
		c.t.Errorf("etcd member %d did not stop within %v", i, stopWait)
	}
}

// Stop stops every member.
func (c *Cluster) Stop() {
	for i := range c.Members {
		c.StopMember(i)
	}
}
