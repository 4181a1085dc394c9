//go:build !race

package agent

// slowdown: 1 outside the race detector (race_test.go).
const slowdown = 1
