//go:build race

package agent

// slowdown stretches the time bounds of the recovery tests under the race
// detector, which slows the agents several times: a bound there checks
// that recovery happens by itself, not how fast.
const slowdown = 5
