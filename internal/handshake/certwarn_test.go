package handshake

import (
	"bytes"
	"log/slog"
	"strings"
	"testing"
	"time"
)

// TestCertWarner: a device warns of its certificate's end within 14 days,
// once a day, says at once when it has ended, and says nothing while it
// has long to go (agents and gateways both use it).
func TestCertWarner(t *testing.T) {
	var buf bytes.Buffer
	log := slog.New(slog.NewTextHandler(&buf, nil))
	t0 := time.Date(2026, 12, 6, 0, 0, 0, 0, time.UTC)
	end := t0.Add(20 * 24 * time.Hour)
	var w CertWarner
	count := func(s string) int { return strings.Count(buf.String(), s) }
	for _, c := range []struct {
		at         time.Time
		soon, gone int
		due        bool
	}{
		{t0, 0, 0, true},                                 // 20 days left: quiet
		{t0.Add(7 * 24 * time.Hour), 1, 0, true},         // 13 days left: warned
		{t0.Add(7*24*time.Hour + time.Hour), 1, 0, true}, // not again within a day
		{t0.Add(8*24*time.Hour + time.Hour), 2, 0, true}, // a day later, again
		{end, 2, 1, true},                                // ended: at once
		{end.Add(time.Hour), 2, 1, true},                 // said once
	} {
		if got := w.Due(c.at, end) || c.at.Sub(w.checked) >= time.Minute; got != c.due {
			t.Fatalf("at %s: due %v", c.at, got)
		}
		w.Check(c.at, end, log)
		if count("expires soon") != c.soon || count("has expired") != c.gone {
			t.Fatalf("at %s: %d soon, %d expired:\n%s", c.at, count("expires soon"), count("has expired"), &buf)
		}
	}
	// The end is due at once, even within the minute.
	var v CertWarner
	v.Check(end.Add(-time.Second), end, log)
	if !v.Due(end, end) {
		t.Fatal("an ended certificate is not due for a check within the minute")
	}
}
