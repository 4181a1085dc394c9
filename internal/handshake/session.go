package handshake

import (
	"errors"
	"sync"
	"sync/atomic"

	"github.com/flynn/noise"

	"github.com/enclavekeys/enclave/internal/control"
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
//
// A server keeps one per SA, and control messages are rare (a rekey
// notice, a close): the session keeps the two transport keys and makes
// the AES-GCM state of one when a message is sealed or opened, and its
// replay window is 64 messages wide, so that an SA's session costs about
// a hundred bytes instead of a kilobyte and a half.
type Session struct {
	Local, Remote    uint32 // session indices: ours and the peer's
	sendKey, recvKey [32]byte
	counter          atomic.Uint64 // the last counter sent
	mu               sync.Mutex
	window           window64
}

func newSession(local, remote uint32, send, recv *noise.CipherState) *Session {
	return &Session{Local: local, Remote: remote, sendKey: send.UnsafeKey(), recvKey: recv.UnsafeKey()}
}

// window64 is a replay window over the last 64 counters: top is the
// highest counter accepted, bit i of seen is top-i.
type window64 struct {
	top  uint64
	seen uint64
}

// check reports whether n is new and within the window.
func (w *window64) check(n uint64) bool {
	switch {
	case n == 0:
		return false
	case n > w.top:
		return true
	case w.top-n >= 64:
		return false
	}
	return w.seen&(1<<(w.top-n)) == 0
}

// accept records n if it is new, and reports whether it was.
func (w *window64) accept(n uint64) bool {
	if !w.check(n) {
		return false
	}
	if n > w.top {
		if d := n - w.top; d >= 64 {
			w.seen = 0
		} else {
			w.seen <<= d
		}
		w.top = n
	}
	w.seen |= 1 << (w.top - n)
	return true
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
	return noise.CipherAESGCM.Cipher(s.sendKey).Encrypt(msg, n, msg, plain), nil
}

// Open authenticates and decodes a Sealed message of this session.
func (s *Session) Open(m *control.Sealed) (control.Inner, error) {
	if m.Receiver != s.Local || m.Sender != s.Remote {
		return control.Inner{}, ErrSessionIndex
	}
	s.mu.Lock()
	fresh := s.window.check(m.Counter)
	s.mu.Unlock()
	if !fresh {
		return control.Inner{}, ErrSessionReplay
	}
	plain, err := noise.CipherAESGCM.Cipher(s.recvKey).Decrypt(nil, m.Counter, m.AD, m.Ciphertext)
	if err != nil {
		return control.Inner{}, ErrSessionAuth
	}
	s.mu.Lock()
	fresh = s.window.accept(m.Counter)
	s.mu.Unlock()
	if !fresh {
		return control.Inner{}, ErrSessionReplay
	}
	return control.ParseInner(plain)
}
