// Package keyclient is what agents and gateways share of talking to the
// key service: waiting for it, with backoff, when it is not there yet or
// not any more, and telling a refusal (which asking again will not change)
// from an outage (which it will).
package keyclient

import (
	"context"
	"errors"
	"log/slog"
	"math/rand/v2"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Backoff of Retry: the first wait, the longest, and how often a failure
// that goes on is logged.
const (
	FirstWait = 250 * time.Millisecond
	MaxWait   = 5 * time.Second
	LogEvery  = 5 * time.Second
	// ReconnectSpread is how long the devices of a key server that went
	// away spread their first reconnects over (issue 36: a restart does
	// not meet every agent at once).
	ReconnectSpread = 2 * time.Second
)

// Spread returns a random wait between half of d and d: waits spread so
// that many devices do not ask at the same moment.
func Spread(d time.Duration) time.Duration {
	if d <= 1 {
		return d
	}
	return d/2 + rand.N(d/2)
}

// Permanent reports whether err is an answer of the key service that asking
// again will not change: the caller is revoked or unknown, has no right to
// what it asks, or asks something malformed. Anything else (unreachable,
// timed out, overloaded, a store outage) may pass.
func Permanent(err error) bool {
	switch status.Code(err) {
	case codes.PermissionDenied, codes.Unauthenticated, codes.InvalidArgument, codes.FailedPrecondition, codes.Unimplemented, codes.NotFound:
		return true
	}
	return false
}

// Retry runs f until it succeeds, fails with a permanent error (returned),
// or ctx ends (ctx's error). Between tries it waits FirstWait, doubling up
// to MaxWait, each wait spread at random over its second half. It logs the first failure, then a line every LogEvery while
// they go on (what, the key service's address, the tries and the last
// error), and a line when the key service answers again.
func Retry(ctx context.Context, log *slog.Logger, what, addr string, f func(context.Context) error) error {
	wait := FirstWait
	var logged time.Time
	for tries := 1; ; tries++ {
		err := f(ctx)
		switch {
		case err == nil:
			if tries > 1 {
				log.Info("key service answers again", "what", what, "keyserver", addr, "tries", tries)
			}
			return nil
		case Permanent(err):
			return err
		case ctx.Err() != nil:
			return errors.Join(ctx.Err(), err)
		}
		if now := time.Now(); now.Sub(logged) >= LogEvery {
			log.Warn("key service unreachable; trying again", "what", what, "keyserver", addr, "tries", tries, "err", err, "next_in", wait)
			logged = now
		}
		select {
		case <-ctx.Done():
			return errors.Join(ctx.Err(), err)
		case <-time.After(Spread(wait)):
		}
		wait = min(2*wait, MaxWait)
	}
}
