package agent

import (
	"bytes"
	"context"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/netip"
	"runtime"
	"strings"
	"testing"
	"time"

	wgconn "golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/conn/bindtest"
	"golang.zx2c4.com/wireguard/device"
	"golang.zx2c4.com/wireguard/tun/netstack"
	"golang.zx2c4.com/wireguard/tun/tuntest"

	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/control"
	"github.com/enclavekeys/enclave/internal/handshake"
	"github.com/enclavekeys/enclave/internal/keys"
)

// The agent's benchmarks, each beside wireguard-go (a test-only
// dependency) doing the same work in the same run:
//
//	BenchmarkHandshake: one full handshake, both sides in this process.
//	  enclave: initiation (Ed25519 signature), the responder's checks
//	  (Noise, certificate chain, signature), its grant (two SA keys derived
//	  from a server key) and response, the initiator's checks; with the
//	  peers' certificates remembered (a returning peer), and forgotten
//	  every time (first contact).
//	  wireguard: CreateMessageInitiation, mac1, ConsumeMessageInitiation,
//	  CreateMessageResponse, ConsumeMessageResponse and both
//	  BeginSymmetricSession, across 256 initiating peers (wireguard-go
//	  refuses a peer's initiations closer than 20 ms apart).
//	BenchmarkTCP: a TCP stream through two agents (netstack on both ends,
//	  UDP on loopback between them), against two wireguard-go devices on
//	  netstack TUNs with UDP on loopback; 1 MiB per iteration.

func BenchmarkHandshake(b *testing.B) {
	b.Run("enclave", func(b *testing.B) { benchEnclaveHandshake(b, false) })
	b.Run("enclave-first-contact", func(b *testing.B) { benchEnclaveHandshake(b, true) })
	b.Run("wireguard", benchWireguardHandshake)
}

// benchEnclaveHandshake runs handshakes between one client and one server;
// with cold, both forget the other's verified certificate every time (a
// first contact: parse and chain verification each time), else only the
// first handshake verifies the chains (a returning peer, a rekey).
func benchEnclaveHandshake(b *testing.B, cold bool) {
	o := newOrg(b, time.Hour)
	client := benchCreds(b, o, clientID("laptop", 7, "100.64.7.1/16"))
	server := benchCreds(b, o, serverID("web1", 3, 258, "100.64.3.1/16"))
	var sk keys.Key
	d, _ := keys.NewDeriver(sk[:], keys.Scope{Level: keys.LevelServer, Enclave: 3, Peer: 7, Server: 258, Generation: 1, HasGeneration: true})
	vc := keys.VC{Enclave: 3, Peer: 7, Server: 258}
	var ck keys.SAKey
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		if cold {
			handshake.ForgetVerified(client)
			handshake.ForgetVerified(server)
		}
		idx := uint32(i + 1)
		ini, msg, err := handshake.Initiate(client, idx, time.Now())
		if err != nil {
			b.Fatal(err)
		}
		in, err := control.ParseInitiation(msg)
		if err != nil {
			b.Fatal(err)
		}
		r, err := handshake.Respond(server, &in, time.Now())
		if err != nil {
			b.Fatal(err)
		}
		g := &control.Grant{PSPVersion: 1, Enclave: 3, Peer: 7, Server: 258, Generation: 1, SPIOut: 0x80000000 | (2*idx)&0x7fffffff, SPIIn: 0x80000000 | (2*idx+1)&0x7fffffff, Lifetime: time.Hour}
		for _, spi := range []uint32{g.SPIOut, g.SPIIn} {
			if err := d.SAKey(&ck, vc, keys.SPI(spi), keys.PSPv1); err != nil {
				b.Fatal(err)
			}
			if spi == g.SPIOut {
				g.KeyOut = append([]byte(nil), ck.Bytes()...)
			} else {
				g.KeyIn = append([]byte(nil), ck.Bytes()...)
			}
		}
		resp, _, err := r.Finish(idx+1, control.ResponderPayload{Grant: g})
		if err != nil {
			b.Fatal(err)
		}
		if _, err := ini.Complete(resp, time.Now()); err != nil {
			b.Fatal(err)
		}
	}
}

func benchCreds(b *testing.B, o *org, id ca.Identity) *handshake.Credentials {
	cert, _, keyPEM := o.Issue(id)
	key, err := ca.ParseKeyPEM(keyPEM)
	if err != nil {
		b.Fatal(err)
	}
	c, err := handshake.NewCredentials(o.Auth.Roots(), cert, key)
	if err != nil {
		b.Fatal(err)
	}
	return c
}

// wgKey makes a wireguard-go private key and its public key, hex.
func wgKey(b testing.TB) (priv, pub string) {
	var k device.NoisePrivateKey
	if _, err := rand32(k[:]); err != nil {
		b.Fatal(err)
	}
	k[0] &= 248
	k[31] = (k[31] & 127) | 64
	p := publicOf(k)
	return hex.EncodeToString(k[:]), hex.EncodeToString(p[:])
}

func benchWireguardHandshake(b *testing.B) {
	const peers = 256
	quiet := device.NewLogger(device.LogLevelSilent, "")
	respPriv, respPub := wgKey(b)
	resp := device.NewDevice(tuntest.NewChannelTUN().TUN(), bindtest.NewChannelBinds()[0], quiet)
	defer resp.Close()
	cfg := "private_key=" + respPriv + "\n"
	type ini struct {
		dev  *device.Device
		peer *device.Peer
		pub  device.NoisePublicKey
	}
	inis := make([]ini, peers)
	for i := range inis {
		priv, pub := wgKey(b)
		d := device.NewDevice(tuntest.NewChannelTUN().TUN(), bindtest.NewChannelBinds()[0], quiet)
		defer d.Close()
		if err := d.IpcSet("private_key=" + priv + "\npublic_key=" + respPub + "\nallowed_ip=10.0.0.1/32\n"); err != nil {
			b.Fatal(err)
		}
		var rp device.NoisePublicKey
		hex.Decode(rp[:], []byte(respPub))
		inis[i] = ini{dev: d, peer: d.LookupPeer(rp)}
		hex.Decode(inis[i].pub[:], []byte(pub))
		cfg += fmt.Sprintf("public_key=%s\nallowed_ip=10.1.%d.%d/32\n", pub, i/256, i%256)
	}
	if err := resp.IpcSet(cfg); err != nil {
		b.Fatal(err)
	}
	var respStatic device.NoisePublicKey
	hex.Decode(respStatic[:], []byte(respPub))
	var gen device.CookieGenerator
	gen.Init(respStatic)
	var chk device.CookieChecker
	chk.Init(respStatic)
	time.Sleep(25 * time.Millisecond) // past the flood window of any earlier handshake
	var buf [device.MessageInitiationSize]byte
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		x := inis[i%peers]
		msg, err := x.dev.CreateMessageInitiation(x.peer)
		if err != nil {
			b.Fatal(err)
		}
		w := bytes.NewBuffer(buf[:0])
		writeLE(w, msg)
		wire := w.Bytes()
		gen.AddMacs(wire)
		if !chk.CheckMAC1(wire) {
			b.Fatal("mac1")
		}
		rpeer := resp.ConsumeMessageInitiation(msg)
		if rpeer == nil {
			b.Fatalf("initiation %d refused", i)
		}
		r, err := resp.CreateMessageResponse(rpeer)
		if err != nil {
			b.Fatal(err)
		}
		if resp.ConsumeMessageResponse(r) == nil && x.dev.ConsumeMessageResponse(r) == nil {
			b.Fatal("response refused")
		}
		if err := rpeer.BeginSymmetricSession(); err != nil {
			b.Fatal(err)
		}
		if err := x.peer.BeginSymmetricSession(); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkTCP(b *testing.B) {
	b.Run("enclave", func(b *testing.B) {
		o := pairOrg(b)
		server := o.agentFor(serverID("web1", 3, 258, "100.64.3.1/16"), nil, nil)
		client := o.agentFor(clientID("laptop", 7, "100.64.7.1/16"), []Route{route(server)}, nil)
		benchStream(b, server.Net(), netip.AddrPortFrom(server.Addr(), 5201), client.Net())
	})
	b.Run("wireguard", func(b *testing.B) {
		srv, cli := wireguardPair(b)
		benchStream(b, srv, netip.AddrPortFrom(netip.MustParseAddr("10.9.0.1"), 5201), cli)
	})
}

// benchStream sends 1 MiB per iteration over one TCP connection from
// client to a sink on server.
func benchStream(b *testing.B, server *netstack.Net, at netip.AddrPort, client *netstack.Net) {
	ln, err := server.ListenTCPAddrPort(at)
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	got := make(chan int64, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			got <- 0
			return
		}
		n, _ := io.Copy(io.Discard, c)
		got <- n
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	c, err := client.DialContextTCPAddrPort(ctx, at)
	cancel()
	if err != nil {
		b.Fatal(err)
	}
	chunk := make([]byte, 1<<20)
	b.SetBytes(int64(len(chunk)))
	b.ResetTimer()
	for b.Loop() {
		if _, err := c.Write(chunk); err != nil {
			b.Fatal(err)
		}
	}
	c.Close()
	if n := <-got; n != int64(b.N)*int64(len(chunk)) {
		b.Fatalf("sink got %d bytes, sent %d", n, b.N*len(chunk))
	}
}

// wireguardPair is two wireguard-go devices on netstack TUNs, peered over
// UDP on loopback.
func wireguardPair(b *testing.B) (*netstack.Net, *netstack.Net) {
	quiet := device.NewLogger(device.LogLevelSilent, "")
	type side struct {
		net  *netstack.Net
		dev  *device.Device
		priv string
		pub  string
		port int
	}
	mk := func(addr string) *side {
		t, n, err := netstack.CreateNetTUN([]netip.Addr{netip.MustParseAddr(addr)}, nil, 1420)
		if err != nil {
			b.Fatal(err)
		}
		priv, pub := wgKey(b)
		return &side{net: n, dev: device.NewDevice(t, wgconn.NewDefaultBind(), quiet), priv: priv, pub: pub, port: freeUDP(b)}
	}
	s, c := mk("10.9.0.1"), mk("10.9.0.2")
	for _, p := range [][2]*side{{s, c}, {c, s}} {
		cfg := fmt.Sprintf("private_key=%s\nlisten_port=%d\npublic_key=%s\nallowed_ip=%s/32\nendpoint=127.0.0.1:%d\n",
			p[0].priv, p[0].port, p[1].pub, map[*side]string{s: "10.9.0.1", c: "10.9.0.2"}[p[1]], p[1].port)
		if err := p[0].dev.IpcSet(cfg); err != nil {
			b.Fatal(err)
		}
		if err := p[0].dev.Up(); err != nil {
			b.Fatal(err)
		}
	}
	b.Cleanup(func() { s.dev.Close(); c.dev.Close() })
	return s.net, c.net
}

func freeUDP(b testing.TB) int {
	c, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	return c.LocalAddr().(*net.UDPAddr).Port
}

// BenchmarkWireguardPeerMemory: the baseline of `enclave bench sas`'s
// memory per SA: wireguard-go's live heap per peer, with 10,000 peers
// configured through its UAPI (a key and an allowed IP each), after a
// garbage collection, reported as B/peer.
//
//	go test ./internal/agent -run '^$' -bench WireguardPeerMemory -benchtime 1x
func BenchmarkWireguardPeerMemory(b *testing.B) {
	const peers = 10000
	quiet := device.NewLogger(device.LogLevelSilent, "")
	for b.Loop() {
		priv, _ := wgKey(b)
		var cfg strings.Builder
		cfg.WriteString("private_key=" + priv + "\n")
		for i := 0; i < peers; i++ {
			_, pub := wgKey(b)
			fmt.Fprintf(&cfg, "public_key=%s\nallowed_ip=10.%d.%d.%d/32\n", pub, i>>16&255, i>>8&255, i&255)
		}
		conf := cfg.String()
		var before, after runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&before)
		d := device.NewDevice(tuntest.NewChannelTUN().TUN(), bindtest.NewChannelBinds()[0], quiet)
		if err := d.IpcSet(conf); err != nil {
			b.Fatal(err)
		}
		runtime.GC()
		runtime.ReadMemStats(&after)
		b.ReportMetric(float64(after.HeapAlloc-before.HeapAlloc)/peers, "B/peer")
		runtime.KeepAlive(d)
		d.Close()
	}
}
