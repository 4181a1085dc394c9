package keyclient

import (
	"errors"
	"testing"
	"time"
)

// TestTracker: Since moves only with the state; the last error stays
// until another comes.
func TestTracker(t *testing.T) {
	var tr Tracker
	t0 := time.Unix(1e9, 0)
	tr.Set(Connecting, t0, nil)
	tr.Set(Watching, t0.Add(time.Second), nil)
	tr.Set(Watching, t0.Add(2*time.Second), nil)
	if c := tr.Get("ks:7443"); c.State != Watching || !c.Since.Equal(t0.Add(time.Second)) || c.Address != "ks:7443" || c.LastError != "" {
		t.Fatalf("%+v", c)
	}
	tr.Set(Reconnecting, t0.Add(3*time.Second), errors.New("connection refused"))
	tr.Set(Watching, t0.Add(4*time.Second), nil)
	if c := tr.Get(""); c.State != Watching || c.LastError != "connection refused" || !c.ErrorAt.Equal(t0.Add(3*time.Second)) {
		t.Fatalf("%+v", c)
	}
}
