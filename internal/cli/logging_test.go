package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"strings"
	"testing"
	"time"
)

// TestRepeatedWarningsHeldBack: a warning repeated ten times in a window
// is logged logBurst times; the first one after the window carries the
// count held back. Info records and other messages are not held back.
func TestRepeatedWarningsHeldBack(t *testing.T) {
	var buf bytes.Buffer
	now := time.Unix(1e9, 0)
	log := slog.New(newRepeatLimiter(slog.NewJSONHandler(&buf, nil), func() time.Time { return now })).With("agent", "a1")
	at := func(level slog.Level, msg string, args ...any) {
		r := slog.NewRecord(now, level, msg, 0)
		r.Add(args...)
		log.Handler().Handle(context.Background(), r)
	}
	for i := range 10 {
		at(slog.LevelWarn, "SA refused", "peer", i) // details differ: still alike
		at(slog.LevelInfo, "SA up", "peer", i)
	}
	at(slog.LevelWarn, "another warning")
	now = now.Add(logWindow)
	at(slog.LevelWarn, "SA refused", "peer", 10)
	var refused, up, other int
	var repeated float64
	for _, line := range strings.Split(strings.TrimSpace(buf.String()), "\n") {
		var m map[string]any
		if err := json.Unmarshal([]byte(line), &m); err != nil {
			t.Fatal(err)
		}
		switch m["msg"] {
		case "SA refused":
			refused++
			if r, ok := m["repeated"].(float64); ok {
				repeated = r
			}
		case "SA up":
			up++
		case "another warning":
			other++
		}
	}
	if refused != logBurst+1 || up != 10 || other != 1 || repeated != 10-logBurst {
		t.Fatalf("%d refused (want %d), %d up, %d other, repeated=%v (want %d):\n%s", refused, logBurst+1, up, other, repeated, 10-logBurst, buf.String())
	}
}

// TestLoggerSettings: the formats and levels, and clear errors for others.
// TestOperatorAskedNeverHeldBack: the failures of an action the operator
// just asked for (a SIGHUP reload) are logged every time, however often
// they repeat; the same message without that mark is held back.
func TestOperatorAskedNeverHeldBack(t *testing.T) {
	var buf bytes.Buffer
	now := time.Unix(1e9, 0)
	log := slog.New(newRepeatLimiter(slog.NewJSONHandler(&buf, nil), func() time.Time { return now }))
	for range 10 {
		log.ErrorContext(operatorAsked(context.Background()), "policy not reloaded: the one in force stays")
	}
	for range 10 {
		log.Error("credentials not reloaded: the ones in force stay")
	}
	out := buf.String()
	if n := strings.Count(out, "policy not reloaded"); n != 10 {
		t.Errorf("%d of 10 failed reloads the operator asked for logged, want all", n)
	}
	if n := strings.Count(out, "credentials not reloaded"); n != logBurst {
		t.Errorf("%d unmarked repeats logged, want %d (the limiter holds back the rest)", n, logBurst)
	}
}

func TestLoggerSettings(t *testing.T) {
	var buf bytes.Buffer
	log, err := newLogger(&buf, logSettings{"text", "warn"})
	if err != nil {
		t.Fatal(err)
	}
	log.Info("not shown")
	log.Warn("shown", "k", 1)
	if out := buf.String(); strings.Contains(out, "not shown") || !strings.Contains(out, `level=WARN msg=shown k=1`) {
		t.Fatalf("text at warn: %q", out)
	}
	buf.Reset()
	log, _ = newLogger(&buf, logSettings{"auto", "debug"}) // a buffer is no terminal: JSON
	log.Debug("dbg", "retry_in", 90*time.Second)
	if !strings.HasPrefix(buf.String(), `{"time"`) || !strings.Contains(buf.String(), `"level":"DEBUG"`) {
		t.Fatalf("auto on a pipe: %q", buf.String())
	}
	// Durations as people read them, not nanoseconds (issue 32).
	if !strings.Contains(buf.String(), `"retry_in":"1m30s"`) {
		t.Fatalf("a duration in JSON: %q", buf.String())
	}
	for _, s := range []logSettings{{"xml", "info"}, {"text", "loud"}} {
		var ee *exitError
		if _, err := newLogger(&buf, s); !errors.As(err, &ee) || ee.code != ExitUsage {
			t.Errorf("%+v: %v, want a usage error", s, err)
		}
	}
}
