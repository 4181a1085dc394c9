package gateway

import (
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/enclavekeys/enclave/internal/gsosize"
)

// runSizes is how the inline gateway learns the segment size of a run it
// takes whole: the run-size program at every interface's ingress
// (internal/gsosize). Without it the queues take no runs whole.
type runSizes struct {
	marker *gsosize.Marker
	// why runs are queued datagram by datagram, when they are.
	why string

	mu     sync.Mutex
	warned time.Time
}

// startRunSizes starts the run-size program, and reports whether the
// queues may take runs whole.
func (g *Gateway) startRunSizes() bool {
	r := &g.runSizes
	if g.cfg.RunsByDatagram {
		r.why = "--runs-by-datagram"
		g.log.Info("runs are queued datagram by datagram, as asked")
		return false
	}
	m, err := gsosize.Start(gsosize.Config{Port: g.cfg.DataPort, Logger: g.log})
	if err != nil {
		r.why = err.Error()
		g.log.Warn("runs are queued datagram by datagram (the kernel cuts them before the gateway judges them: exact, but slower), since the gateway cannot learn their segment size", "err", err,
			"what to do", "run the gateway with CAP_BPF and CAP_NET_ADMIN on Linux 6.6 or later (the systemd unit grants them), or say --runs-by-datagram to choose this")
		return false
	}
	r.marker = m
	g.log.Info("runs are taken whole and cut at the segment size the kernel gives", "interfaces", strings.Join(m.Interfaces(), ","))
	return true
}

// unknown counts a run dropped for want of its segment size, and says so
// in the log at most every ten seconds.
func (r *runSizes) unknown(g *Gateway, mark uint32) {
	g.metrics.run("size_unknown", 0)
	now := time.Now()
	r.mu.Lock()
	warn := now.Sub(r.warned) >= 10*time.Second
	if warn {
		r.warned = now
	}
	r.mu.Unlock()
	if warn {
		cause := "it arrived on an interface the run-size program is not on (just made, or it could not join it: see enclave status)"
		if mark != 0 {
			cause = fmt.Sprintf("its mark %#x is not the gateway's: a rule marked it before the queue (leave the data port's packets unmarked)", mark)
		}
		g.log.Warn("a run of data packets had no known segment size and was dropped whole", "cause", cause)
	}
}

// describe says how runs are taken, for status, and whether whole.
func (r *runSizes) describe() (string, bool) {
	if r.marker == nil {
		return "datagram by datagram: " + r.why, false
	}
	d := "whole, cut at the kernel's segment size (run-size program on " + strings.Join(r.marker.Interfaces(), ", ") + ")"
	if failed := r.marker.Failed(); len(failed) > 0 {
		var fs []string
		for _, n := range slices.Sorted(maps.Keys(failed)) {
			fs = append(fs, n+": "+failed[n])
		}
		d += "; NOT on " + strings.Join(fs, "; ") + ": runs arriving there are dropped (restart the gateway)"
	}
	return d, true
}

func (r *runSizes) close() {
	if r.marker != nil {
		r.marker.Close()
	}
}
