package handshake

import (
	"errors"
	"sync"
	"sync/atomic"

	"github.com/flynn/noise"

	"github.com/enclavekeys/enclave/internal/control"
	"github.com/enclavekeys/enclave/internal/replay"
)

// Errors of sessions.
var (
	ErrSessionReplay = errors.New("handshake: sealed message replayed or too old")
	ErrSessionAuth   = errors.New("handshake: sealed message failed authentication")
	ErrSessionIndex  = errors.New("handshake: sealed message for another session")
	ErrCounter       = errors.New("handshake: session counter exhausted")
)

// Session carries sealed control messages after a handshake, each under
// the direction's Noise transport key with an explicit counter (UDP may
// lose and reorder), and a replay window on receive. Safe for concurrent
// use.
type Session struct {
	Local, Remote uint32 // session indices: ours and the peer's
	send, recv    noise.Cipher
	counter       atomic.Uint64 // the last counter sent
	mu            sync.Mutex
	window        replay.Filter
}

func newSession(local, remote uint32, send, recv *noise.CipherState) *Session {
	return &Session{Local: local, Remote: remote, send: send.Cipher(), recv: recv.Cipher()}
}

// Seal encodes and seals in as a Sealed datagram to the peer.
func (s *Session) Seal(in *control.Inner) ([]byte, error) {
	n := s.counter.Add(1) // from 1: the replay filter never accepts 0
	if n == 0 || n == ^uint64(0) {
		return nil, ErrCounter
	}
	plain, err := control.AppendInner(nil, in)
	if err != nil {
		return nil, err
	}
	msg, err := control.AppendSealedFraming(nil, s.Local, s.Remote, n)
	if err != nil {
		return nil, err
	}
	return s.send.Encrypt(msg, n, msg, plain), nil
}

// Open authenticates and decodes a Sealed message of this session.
func (s *Session) Open(m *control.Sealed) (control.Inner, error) {
	if m.Receiver != s.Local || m.Sender != s.Remote {
		return control.Inner{}, ErrSessionIndex
	}
	s.mu.Lock()
	fresh := s.window.Check(m.Counter)
	s.mu.Unlock()
	if !fresh {
		return control.Inner{}, ErrSessionReplay
	}
	plain, err := s.recv.Decrypt(nil, m.Counter, m.AD, m.Ciphertext)
	if err != nil {
		return control.Inner{}, ErrSessionAuth
	}
	s.mu.Lock()
	fresh = s.window.Accept(m.Counter)
	s.mu.Unlock()
	if !fresh {
		return control.Inner{}, ErrSessionReplay
	}
	return control.ParseInner(plain)
}
