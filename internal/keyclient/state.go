package keyclient

import (
	"sync"
	"time"
)

// Connection is what a process knows of its key service connection, for
// `enclave status`.
type Connection struct {
	Address string `json:"address"`
	// State: connecting (no answer yet), watching (the watch stream is
	// up and its snapshot arrived), reconnecting (the stream broke; the
	// process goes on with what it holds).
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
