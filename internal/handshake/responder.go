package handshake

import (
	"crypto/ed25519"
	"fmt"
	"time"

	"github.com/flynn/noise"

	"github.com/enclavekeys/enclave/internal/control"
)

// Responding is an initiation the responder has authenticated and now
// answers: the caller looks at Peer (and the path record) and decides on
// a grant or a refusal, then calls Finish.
type Responding struct {
	creds     *Credentials
	hs        *noise.HandshakeState
	sender    uint32 // the initiator's index
	digest    [32]byte
	Peer      *Peer
	Timestamp time.Time
	// Initiation is the parsed message (its path record for discovery).
	Initiation control.Initiation
}

// Respond reads an Initiation: the Noise message, the initiator's
// certificate (valid at now, of the org CA) and its signature binding the
// certificate to the Noise static key, and the timestamp (within
// control.MaxSkew of now). Replay of an older initiation is the caller's
// to refuse (it knows the last timestamp per identity; see Replay).
func Respond(c *Credentials, in *control.Initiation, now time.Time) (*Responding, error) {
	hs, err := noise.NewHandshakeState(noise.Config{
		CipherSuite: suite, Pattern: noise.HandshakeIX, Initiator: false,
		StaticKeypair: c.Static, Prologue: control.Prologue(in.Sender),
	})
	if err != nil {
		return nil, err
	}
	payload, _, _, err := hs.ReadMessage(nil, in.Noise)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrNoise, err)
	}
	p, err := control.ParseInitiatorPayload(payload)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrPayload, err)
	}
	static := hs.PeerStatic()
	peer, err := c.verifyPeer(p.Cert, p.Signature[:], control.InitiatorSigned(static, p.Timestamp, in.Sender), now)
	if err != nil {
		return nil, err
	}
	if d := p.Timestamp.Sub(now); d > control.MaxSkew || d < -control.MaxSkew {
		return nil, fmt.Errorf("%w: %s off", ErrClock, d.Round(time.Second))
	}
	peer.Static = append([]byte(nil), static...)
	return &Responding{creds: c, hs: hs, sender: in.Sender, digest: control.InitiationDigest(in), Peer: peer, Timestamp: p.Timestamp, Initiation: *in}, nil
}

// Finish answers with payload (a grant or a refusal; its certificate and
// signature are filled in here) under the responder's index sender, and
// returns the Response datagram and the session it opens.
func (r *Responding) Finish(sender uint32, payload control.ResponderPayload) ([]byte, *Session, error) {
	payload.Cert = r.creds.CertDER
	copy(payload.Signature[:], ed25519.Sign(r.creds.Key, control.ResponderSigned(r.creds.Static.Public, r.digest)))
	pb, err := payload.Append(nil)
	if err != nil {
		return nil, nil, err
	}
	m2, recv, send, err := r.hs.WriteMessage(nil, pb)
	if err != nil || send == nil || recv == nil {
		return nil, nil, fmt.Errorf("%w: %v", ErrNoise, err)
	}
	msg, err := control.AppendResponse(nil, sender, r.sender, m2)
	if err != nil {
		return nil, nil, err
	}
	return msg, newSession(sender, r.sender, send, recv), nil
}
