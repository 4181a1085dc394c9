package cli

import (
	"errors"
	"strings"
	"testing"

	"github.com/enclavekeys/enclave/internal/lab"
)

// TestGoalsMet: --check fails (exit 1) naming each goal not met, with its
// figure and what it wants in their units; without --check, or with
// every goal met, nothing fails.
func TestGoalsMet(t *testing.T) {
	goals := []lab.Goal{
		{Name: "memory", Want: "<= 51200", Got: 60 << 10, Unit: "B", Met: false},
		{Name: "rotation", Want: "< 1000", Got: 250, Unit: "ms", Met: true},
		{Name: "restart", Want: "< 5", Got: 7.5, Unit: "s", Met: false},
	}
	if err := goalsMet(goals, false); err != nil {
		t.Fatalf("without --check: %v", err)
	}
	err := goalsMet(goals, true)
	var ee *exitError
	if !errors.As(err, &ee) || ee.code != ExitFailed {
		t.Fatalf("with --check and goals not met: %v", err)
	}
	for _, want := range []string{"memory: 60.0 KiB, want <= 50 KiB", "restart: 7.5 s, want < 5 s"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("%q lacks %q", err, want)
		}
	}
	if strings.Contains(err.Error(), "rotation") {
		t.Errorf("%q names a goal met", err)
	}
	if err := goalsMet(goals[1:2], true); err != nil {
		t.Fatalf("every goal met: %v", err)
	}
}
