package lab

import (
	"os/exec"
	"time"
)

// waitOrKill waits for a process told to stop, and kills it if it has not
// stopped within d.
func waitOrKill(p *exec.Cmd, d time.Duration) {
	done := make(chan struct{})
	go func() { p.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(d):
		p.Process.Kill()
		<-done
	}
}
