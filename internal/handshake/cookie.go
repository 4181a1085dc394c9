package handshake

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"net/netip"
	"sync"
	"time"

	"github.com/enclavekeys/enclave/internal/control"
)

// CookieLifetime is how long a cookie secret is current; the one before
// still counts, so a cookie is good for one to two lifetimes.
const CookieLifetime = 2 * time.Minute

func hmacSHA256(key, msg []byte) []byte {
	m := hmac.New(sha256.New, key)
	m.Write(msg)
	return m.Sum(nil)
}

// Cookies makes and checks the responder's cookies (DESIGN §5.8, as
// WireGuard does): a cookie is a MAC of the initiator's address under a
// secret that changes every CookieLifetime, so checking one costs two
// HMACs and no state per initiator. Safe for concurrent use.
type Cookies struct {
	mu        sync.Mutex
	cur, prev [32]byte
	since     time.Time
}

// NewCookies returns a cookie maker with a fresh secret.
func NewCookies(now time.Time) *Cookies {
	c := &Cookies{since: now}
	rand.Read(c.cur[:]) // crypto/rand never fails (it aborts the program instead)
	c.prev = c.cur
	return c
}

// secrets returns the current and previous secrets at now, rotating first
// when the current one is older than CookieLifetime.
func (c *Cookies) secrets(now time.Time) ([32]byte, [32]byte) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if now.Sub(c.since) >= CookieLifetime {
		c.prev = c.cur
		rand.Read(c.cur[:])
		c.since = now
	}
	return c.cur, c.prev
}

func cookieFor(secret [32]byte, src netip.AddrPort) [control.MACLen]byte {
	b, _ := src.MarshalBinary()
	var out [control.MACLen]byte
	copy(out[:], hmacSHA256(secret[:], b))
	return out
}

// Make returns the cookie for an initiator at src.
func (c *Cookies) Make(src netip.AddrPort, now time.Time) [control.MACLen]byte {
	cur, _ := c.secrets(now)
	return cookieFor(cur, src)
}

// Check reports whether in carries a mac2 made with a cookie this
// responder gave src (under the current or the previous secret).
func (c *Cookies) Check(src netip.AddrPort, in *control.Initiation, now time.Time) bool {
	cur, prev := c.secrets(now)
	for _, s := range [][32]byte{cur, prev} {
		want := MAC2(cookieFor(s, src), in.Authenticated)
		if equalMAC(want[:], in.MAC2[:]) {
			return true
		}
	}
	return false
}
