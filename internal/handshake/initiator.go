package handshake

import (
	"crypto/ed25519"
	"crypto/subtle"
	"fmt"
	"time"

	"github.com/flynn/noise"

	"github.com/enclavekeys/enclave/internal/control"
)

// Initiator is a handshake in flight on the initiating side.
type Initiator struct {
	creds  *Credentials
	sender uint32
	hs     *noise.HandshakeState
	msg    []byte // the initiation as sent (mac2 zero)
	macAt  int
	digest [32]byte
	// cfg (with the ephemeral key fixed) and payload remake hs as it was
	// after the initiation, when a Response that is not the responder's
	// left it changed: a forged Response cannot end the handshake.
	cfg     noise.Config
	payload []byte
}

// Initiate starts a handshake with sender index sender and returns the
// Initiation datagram to send to the responder's control port.
func Initiate(c *Credentials, sender uint32, now time.Time) (*Initiator, []byte, error) {
	hs, err := noise.NewHandshakeState(noise.Config{
		CipherSuite: suite, Pattern: noise.HandshakeIX, Initiator: true,
		StaticKeypair: c.Static, Prologue: control.Prologue(sender),
	})
	if err != nil {
		return nil, nil, err
	}
	p := control.InitiatorPayload{Timestamp: now, Cert: c.CertDER}
	copy(p.Signature[:], ed25519.Sign(c.Key, control.InitiatorSigned(c.Static.Public, now, sender)))
	payload, err := p.Append(nil)
	if err != nil {
		return nil, nil, err
	}
	m1, _, _, err := hs.WriteMessage(nil, payload)
	if err != nil {
		return nil, nil, err
	}
	cfg := noise.Config{CipherSuite: suite, Pattern: noise.HandshakeIX, Initiator: true,
		StaticKeypair: c.Static, Prologue: control.Prologue(sender), Random: sameEphemeral(hs.LocalEphemeral().Private)}
	msg, macAt, err := control.AppendInitiation(nil, sender, m1)
	if err != nil {
		return nil, nil, err
	}
	in, err := control.ParseInitiation(msg)
	if err != nil {
		return nil, nil, err
	}
	return &Initiator{creds: c, sender: sender, hs: hs, msg: msg, macAt: macAt, digest: control.InitiationDigest(&in), cfg: cfg, payload: payload}, msg, nil
}

// reset remakes the handshake state as it was right after the initiation
// (the same ephemeral key and message), for the next Response.
func (i *Initiator) reset() error {
	hs, err := noise.NewHandshakeState(i.cfg)
	if err != nil {
		return err
	}
	if _, _, _, err := hs.WriteMessage(nil, i.payload); err != nil {
		return err
	}
	i.hs = hs
	return nil
}

// Sender is the initiator's session index.
func (i *Initiator) Sender() uint32 { return i.sender }

// WithCookie returns the initiation again with mac2 under cookie, for a
// responder that answered with a CookieReply.
func (i *Initiator) WithCookie(cookie [control.MACLen]byte) []byte {
	out := append([]byte(nil), i.msg...)
	mac := MAC2(cookie, out[:i.macAt])
	copy(out[i.macAt:], mac[:])
	return out
}

// Result is a completed handshake on the initiating side.
type Result struct {
	Peer    *Peer
	Payload control.ResponderPayload // the grant or refusal
	Session *Session
}

// Complete checks the responder's Response: the Noise message, the
// responder's certificate at now and its signature over this initiation.
// A refusal is a successful handshake whose Payload.Refusal is set. A
// Response that fails leaves the Initiator as it was: the real one may
// still come.
func (i *Initiator) Complete(msg []byte, now time.Time) (*Result, error) {
	resp, err := control.ParseResponse(msg)
	if err != nil {
		return nil, err
	}
	if resp.Receiver != i.sender {
		return nil, ErrIndex
	}
	payload, send, recv, err := i.hs.ReadMessage(nil, resp.Noise)
	if err != nil || send == nil || recv == nil {
		// Noise may have changed its state on the way to the failure
		// (a short message or a bad point leave it half-read).
		if rerr := i.reset(); rerr != nil {
			return nil, fmt.Errorf("%w: %v (and the state could not be remade: %v)", ErrNoise, err, rerr)
		}
		return nil, fmt.Errorf("%w: %v", ErrNoise, err)
	}
	// Anyone can answer an IX initiation with a Noise message that reads
	// (its own keys): until the certificate and signature check, nothing
	// is settled, and a failure puts the state back.
	p, err := control.ParseResponderPayload(payload)
	if err != nil {
		i.reset()
		return nil, fmt.Errorf("%w: %v", ErrPayload, err)
	}
	static := i.hs.PeerStatic()
	peer, err := i.creds.verifyPeer(p.Cert, p.Signature[:], control.ResponderSigned(static, i.digest), now)
	if err != nil {
		i.reset()
		return nil, err
	}
	peer.Static = append([]byte(nil), static...)
	return &Result{Peer: peer, Payload: p, Session: newSession(i.sender, resp.Sender, send, recv)}, nil
}

// MAC2 is HMAC-SHA256(cookie, authenticated)[:16]: the initiation's proof
// that its sender received a cookie at its address.
func MAC2(cookie [control.MACLen]byte, authenticated []byte) [control.MACLen]byte {
	var out [control.MACLen]byte
	copy(out[:], hmacSHA256(cookie[:], authenticated))
	return out
}

// equalMAC compares MACs in constant time.
func equalMAC(a, b []byte) bool { return subtle.ConstantTimeCompare(a, b) == 1 }
