// Package agent is Enclave's host agent (DESIGN §5 and §7): it forms SAs
// with other hosts through the control protocol's handshake, as a client
// (initiator) towards the peers it routes to and as a server (responder)
// for the clients that reach it, keeps them current across rotations,
// revocations and their lifetime, and carries inner IP packets over them
// between an in-process network stack (netstack) and the underlay's UDP.
// It is split as wireguard-go's device package is: config, the agent and
// its SAs (agent.go, conn.go), the data path (send.go, receive.go), the
// control port (control.go: handshakes, cookies, sealed messages), the
// key service (keys.go) and timers (timers.go).
package agent

import (
	"errors"
	"log/slog"
	"net/netip"
	"time"

	"github.com/enclavekeys/enclave/internal/api"
	"github.com/enclavekeys/enclave/internal/control"
	"github.com/enclavekeys/enclave/internal/handshake"
	"github.com/enclavekeys/enclave/internal/keys"
)

// Route sends an overlay prefix's traffic to a peer's underlay data
// endpoint (its control port is the next one).
type Route struct {
	Prefix   netip.Prefix
	Endpoint netip.AddrPort
}

// Config sets up an Agent. Zero fields take the defaults.
type Config struct {
	// Credentials are the device's certificate, key, Noise static key and
	// the org root; the certificate must carry an overlay address.
	Credentials *handshake.Credentials
	// Listen is the data port's address (default 0.0.0.0:1000); the
	// control port is the next port on the same address.
	Listen netip.AddrPort
	// Public are the data endpoints clients reach this server at through
	// a NAT (port forwarding), when they are not its own addresses: a
	// gateway's path entry names the destination it sent a handshake to,
	// and a server trusts only entries naming its own control port (the
	// next port) at its own addresses or at these.
	Public []netip.AddrPort
	// Routes are where this agent initiates SAs to (as a client).
	Routes []Route
	// Via sends every datagram through a relay gateway at this data
	// address (its control port is the next), framed with the peer's
	// endpoint (docs/PROTOCOL.md, relay framing); only the relay's
	// datagrams are taken. Zero: straight to the peers.
	Via netip.AddrPort
	// KeyService makes the agent a server: it fetches its server keys from
	// it and watches generations and revocations. Nil for a client.
	KeyService api.KeyServiceClient
	// KeyServiceAddr names the key service in log lines (its address or
	// addresses); it is not dialled from here.
	KeyServiceAddr string
	// SelfReport is the enclave this device believes it is in, put first
	// in its initiations' path records (0: none). A server trusts it only
	// with TrustUnsigned, and never over a certificate or a signed chain.
	SelfReport keys.EnclaveID
	// TrustUnsigned lets unsigned path entries and self-reports decide a
	// client's enclave when nothing better does (servers only).
	TrustUnsigned bool
	// Lifetime is how long an SA this server grants may be used (default
	// 1h); clients re-establish RekeyBefore its end (default a fifth of it).
	Lifetime    time.Duration
	RekeyBefore time.Duration
	// RekeyAfter is the IV after which an SA is re-established (default
	// sa.DefaultRekeyAfter).
	RekeyAfter uint64
	// RekeySpread bounds how long a server takes to ask all its clients
	// to re-establish after a rotation (default 5m; it also takes no
	// longer than half the time the old generation has left).
	RekeySpread time.Duration
	// IdleTimeout ends a server's SAs that received nothing for this long
	// (0: only their lifetime ends them).
	IdleTimeout time.Duration
	// TUN names a kernel TUN device to carry inner packets (created, given
	// the overlay address and the routes; needs CAP_NET_ADMIN). Empty: the
	// in-process network stack (Net), which needs no privileges.
	TUN string
	// MTU of the network stack (default 1380: an inner packet plus the PSP
	// overhead and outer IPv6/UDP headers fits a 1500-byte underlay).
	MTU int
	// Guard sets the handshake flood limits.
	Guard handshake.GuardConfig
	// Logger gets the agent's structured logs (default: discarded).
	Logger *slog.Logger
	// Now is the clock (default time.Now).
	Now func() time.Time
}

// Defaults.
const (
	DefaultLifetime = time.Hour
	DefaultMTU      = 1380
	// DefaultRekeySpread bounds the spreading of rekey notices.
	DefaultRekeySpread = 5 * time.Minute
	// handshakeTimeout is how long an initiation waits for its response
	// before a fresh one is sent, and handshakeTries how many are sent.
	handshakeTimeout = time.Second
	handshakeTries   = 5
	// maxQueued packets wait per destination while its SA is being made.
	maxQueued = 64
	// socketBuffer is the data port's socket buffer size asked for.
	socketBuffer = 7 << 20
	// drain is how long an SA that was replaced keeps being accepted, for
	// the packets already on their way (make before break).
	drain = 10 * time.Second
)

// Errors of configuration.
var (
	ErrNoOverlay = errors.New("agent: the certificate carries no overlay address (cert issue --ip)")
	ErrConfig    = errors.New("agent: bad configuration")
)

func (c *Config) withDefaults() Config {
	d := *c
	if !d.Listen.IsValid() {
		d.Listen = netip.AddrPortFrom(netip.IPv4Unspecified(), 1000)
	}
	if d.Via.IsValid() {
		d.Via = netip.AddrPortFrom(d.Via.Addr().Unmap(), d.Via.Port())
	}
	if d.Lifetime <= 0 {
		d.Lifetime = DefaultLifetime
	}
	if d.RekeyBefore <= 0 || d.RekeyBefore >= d.Lifetime {
		d.RekeyBefore = d.Lifetime / 5
	}
	if d.RekeySpread <= 0 {
		d.RekeySpread = DefaultRekeySpread
	}
	if d.MTU <= 0 {
		d.MTU = DefaultMTU
	}
	if d.Logger == nil {
		d.Logger = slog.New(slog.DiscardHandler)
	}
	if d.Now == nil {
		d.Now = time.Now
	}
	return d
}

// decorate adds this agent's own path entry (a self-report) to an
// initiation it sends.
func (c *Config) decorate(msg []byte) []byte {
	if c.SelfReport == 0 {
		return msg
	}
	at, err := control.PathOffset(msg)
	if err != nil {
		return msg
	}
	out, err := control.AppendEntry(msg, at, &control.PathEntry{Flags: control.PathSelfReport, Enclave: uint16(c.SelfReport)})
	if err != nil {
		return msg
	}
	return out
}
