package keyclient

import (
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// IsRevoked reports whether err is the key service refusing this device
// because it is revoked (as opposed to a refusal an admin may lift, or an
// outage).
func IsRevoked(err error) bool {
	st, ok := status.FromError(err)
	return ok && st.Code() == codes.PermissionDenied && strings.Contains(st.Message(), " was revoked at ")
}

// Connection is what a process knows of its key service connection, for
// `enclave status`.
type Connection struct {
	Address string `json:"address"`
	// State: connecting (no answer yet), watching (the watch stream is
	// up and its snapshot arrived), reconnecting (the stream broke; the
	// process goes on with what it holds), revoked (the key service
	// revoked this device: it asks nothing more).
	State     string    `json:"state"`
	Since     time.Time `json:"since"`
	LastError string    `json:"last_error,omitempty"`
	ErrorAt   time.Time `json:"error_at,omitzero"`
}

// The states.
const (
	Connecting   = "connecting"
	Watching     = "watching"
	Reconnecting = "reconnecting"
	Revoked      = "revoked"
)

// Tracker keeps a Connection up to date. Safe for concurrent use; the
// zero value is ready.
type Tracker struct {
	mu sync.Mutex
	c  Connection
}

// Set records state at now (Since changes only with the state), and err
// as the last error when it is not nil.
func (t *Tracker) Set(state string, now time.Time, err error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.c.State != state {
		t.c.State, t.c.Since = state, now.UTC()
	}
	if err != nil {
		t.c.LastError, t.c.ErrorAt = err.Error(), now.UTC()
	}
}

// Get returns the connection as known, with address.
func (t *Tracker) Get(address string) Connection {
	t.mu.Lock()
	defer t.mu.Unlock()
	c := t.c
	c.Address = address
	return c
}
