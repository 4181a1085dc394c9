package cli

import (
	"context"
	"io"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/spf13/pflag"
)

// logSettings are the --log-format and --log-level of a long-running
// command (agent, gateway, keyserver).
type logSettings struct{ Format, Level string }

// logFlags adds --log-format and --log-level, kept in format and level
// (the commands' settings, YAML keys log-format and log-level).
func logFlags(fl *pflag.FlagSet, format, level *string) {
	fl.StringVar(format, "log-format", "auto", "text, json, or auto: text on a terminal, JSON otherwise")
	fl.StringVar(level, "log-level", "info", "debug, info, warn or error")
}

// Repeated warnings: at most logBurst records of one message at WARN or
// above pass in each logWindow; the next one after it says how many were
// held back. Bounded: past logKeys messages the counts start again.
const (
	logWindow = 10 * time.Second
	logBurst  = 3
	logKeys   = 1024
)

// newLogger makes the process's logger on w from the settings.
func newLogger(w io.Writer, s logSettings) (*slog.Logger, error) {
	var level slog.Level
	switch strings.ToLower(s.Level) {
	case "debug":
		level = slog.LevelDebug
	case "info", "":
		level = slog.LevelInfo
	case "warn", "warning":
		level = slog.LevelWarn
	case "error":
		level = slog.LevelError
	default:
		return nil, usagef("--log-level %q: want debug, info, warn or error", s.Level)
	}
	// Durations are written as people read them ("1m30s"), not as
	// nanoseconds: slog's JSON would give 90000000000.
	opts := &slog.HandlerOptions{Level: level, ReplaceAttr: func(_ []string, a slog.Attr) slog.Attr {
		if a.Value.Kind() == slog.KindDuration {
			return slog.String(a.Key, a.Value.Duration().String())
		}
		return a
	}}
	var h slog.Handler
	switch strings.ToLower(s.Format) {
	case "json":
		h = slog.NewJSONHandler(w, opts)
	case "text":
		h = slog.NewTextHandler(w, opts)
	case "auto", "":
		if isTerminal(w) {
			h = slog.NewTextHandler(w, opts)
		} else {
			h = slog.NewJSONHandler(w, opts)
		}
	default:
		return nil, usagef("--log-format %q: want text, json or auto", s.Format)
	}
	return slog.New(newRepeatLimiter(h, time.Now)), nil
}

// repeatLimiter is a slog.Handler that holds back a warning or error
// repeated more than logBurst times in logWindow (a gateway's key service
// refusal twice a second, a revoked peer's handshakes), and puts the count
// of those held back on the next one that passes. Records are alike when
// their level, message and the logger's own attributes match; the
// record's attributes (a peer, an error) are not compared, so a flood
// with varying details is held back too.
type repeatLimiter struct {
	next   slog.Handler
	scope  string // the attributes and groups given to this logger
	shared *repeats
}

type repeats struct {
	mu   sync.Mutex
	now  func() time.Time
	seen map[string]*repeat
}

type repeat struct {
	start  time.Time // the window's start
	passed int       // records passed in the window
	held   int       // records held back since the last that passed
}

func newRepeatLimiter(next slog.Handler, now func() time.Time) *repeatLimiter {
	return &repeatLimiter{next: next, shared: &repeats{now: now, seen: map[string]*repeat{}}}
}

// Enabled implements slog.Handler.
func (h *repeatLimiter) Enabled(ctx context.Context, l slog.Level) bool {
	return h.next.Enabled(ctx, l)
}

// askedKey marks a context whose records answer something the operator
// just did (a SIGHUP): never held back, however often they repeat, since
// an operator retrying must see every outcome.
type askedKey struct{}

// operatorAsked is ctx for the log records of an action the operator
// asked for.
func operatorAsked(ctx context.Context) context.Context {
	return context.WithValue(ctx, askedKey{}, true)
}

// Handle implements slog.Handler.
func (h *repeatLimiter) Handle(ctx context.Context, r slog.Record) error {
	if r.Level < slog.LevelWarn || ctx.Value(askedKey{}) != nil {
		return h.next.Handle(ctx, r)
	}
	held, pass := h.shared.take(h.scope+"\x00"+r.Level.String()+"\x00"+r.Message, r.Time)
	if !pass {
		return nil
	}
	if held > 0 {
		r = r.Clone()
		r.AddAttrs(slog.Int("repeated", held)) // held back since the last one logged
	}
	return h.next.Handle(ctx, r)
}

// take reports whether a record of key at t passes, and how many were
// held back before it.
func (s *repeats) take(key string, t time.Time) (held int, pass bool) {
	if t.IsZero() {
		t = s.now()
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	r := s.seen[key]
	if r == nil {
		if len(s.seen) >= logKeys {
			clear(s.seen)
		}
		r = &repeat{start: t}
		s.seen[key] = r
	}
	if t.Sub(r.start) >= logWindow {
		r.start, r.passed = t, 0
	}
	if r.passed >= logBurst {
		r.held++
		return 0, false
	}
	r.passed++
	held, r.held = r.held, 0
	return held, true
}

// WithAttrs implements slog.Handler.
func (h *repeatLimiter) WithAttrs(as []slog.Attr) slog.Handler {
	scope := h.scope
	for _, a := range as {
		scope += a.String() + " "
	}
	return &repeatLimiter{next: h.next.WithAttrs(as), scope: scope, shared: h.shared}
}

// WithGroup implements slog.Handler.
func (h *repeatLimiter) WithGroup(name string) slog.Handler {
	return &repeatLimiter{next: h.next.WithGroup(name), scope: h.scope + name + ".", shared: h.shared}
}

// logStopped says that a process stopped and why: the signal it was
// given (ctx is signal.NotifyContext's), or the error it ended with.
func logStopped(log *slog.Logger, what string, ctx context.Context, err error) {
	switch {
	case err != nil:
		log.Error(what+" stopped", "reason", err.Error())
	case context.Cause(ctx) != nil:
		log.Info(what+" stopped", "reason", context.Cause(ctx).Error())
	default:
		log.Info(what + " stopped")
	}
}
