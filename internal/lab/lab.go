// Package lab runs the whole system in one process (DESIGN §8): the
// seed's Fig 1A with four enclaves, an org key server and two enclave key
// servers (one of them holding its own enclave key), relay gateways on the
// enclave boundaries with grants, an org-wide monitor, and servers and
// clients as netstack agents, every one of them through the real code
// paths (gRPC over mTLS and UDP on loopback, the packages the commands
// use). It runs a scenario that touches every part, step by step, and
// reports each step's outcome with its figures, and the visibility map of
// what it saw.
package lab

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"time"
)

// Config sets up a run.
type Config struct {
	// Dir holds the CA, certificates, store, audit log and flow logs; it
	// is kept afterwards (--keep). Empty: a temporary directory, removed.
	Dir string
	// Seed picks the scenario's payloads and orders (0: a fixed one).
	Seed int64
	// Progress gets a line per step as it goes; Terminal makes it a line
	// rewritten in place while the step runs.
	Progress io.Writer
	Terminal bool
	// Log gets the components' structured logs (default: discarded).
	Log *slog.Logger
	// Faults adds the faults that need real processes to a namespaced
	// run (RunNetns).
	Faults bool
}

// Step is one step's outcome.
type Step struct {
	Name    string  `json:"name"`
	What    string  `json:"what"`
	Passed  bool    `json:"passed"`
	Seconds float64 `json:"seconds"`
	Error   string  `json:"error,omitempty"`
	Figures []Fig   `json:"figures"`
}

// Fig is one figure of a step: a name and its value.
type Fig struct {
	Name  string `json:"name"`
	Value string `json:"value"`
}

// Report is what a run found.
type Report struct {
	Org     string  `json:"org"`
	Dir     string  `json:"dir,omitempty"`
	Seed    int64   `json:"seed"`
	Seconds float64 `json:"seconds"`
	Passed  bool    `json:"passed"`
	Steps   []Step  `json:"steps"`
	// Map is the visibility map's data (the HTML page draws it).
	Map any `json:"map,omitempty"`
}

// Print writes the report as a table a person reads.
func (r *Report) Print(w io.Writer) {
	fmt.Fprintf(w, "\nEnclave lab: %s, %d steps in %.1f s\n\n", r.Org, len(r.Steps), r.Seconds)
	for i, s := range r.Steps {
		mark := "PASS"
		if !s.Passed {
			mark = "FAIL"
		}
		fmt.Fprintf(w, "%2d. %-4s %-34s %5.1fs  %s\n", i+1, mark, s.Name, s.Seconds, s.What)
		var figs []string
		for _, f := range s.Figures {
			figs = append(figs, f.Name+" "+f.Value)
		}
		if len(figs) > 0 {
			fmt.Fprintf(w, "              %s\n", strings.Join(figs, " · "))
		}
		if s.Error != "" {
			fmt.Fprintf(w, "              error: %s\n", s.Error)
		}
	}
	verdict := "all steps passed"
	if !r.Passed {
		verdict = "some steps FAILED"
	}
	fmt.Fprintf(w, "\n%s\n", verdict)
}

// JSON writes the report as JSON.
func (r *Report) JSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(r)
}

// Run runs the scenario and returns its report. The error is for a lab
// that could not be set up at all; failed steps are in the report.
func Run(ctx context.Context, cfg Config) (*Report, error) {
	s, end, err := begin(ctx, cfg, "enclave-lab-")
	if err != nil {
		return nil, err
	}
	defer end()
	defer s.o.stop()
	s.run()
	return s.finish(), nil
}

// begin sets a run up: the defaults, its directory (cfg.Dir, kept, or a
// temporary one that end removes) and the organisation's CA in it.
func begin(ctx context.Context, cfg Config, tmpPrefix string) (*scenario, func(), error) {
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.Progress == nil {
		cfg.Progress = io.Discard
	}
	dir, end := cfg.Dir, func() {}
	if dir == "" {
		d, err := os.MkdirTemp("", tmpPrefix)
		if err != nil {
			return nil, nil, err
		}
		dir, end = d, func() { os.RemoveAll(d) }
	} else if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, nil, err
	}
	o, err := newOrg(dir, cfg.Log)
	if err != nil {
		end()
		return nil, nil, err
	}
	s := &scenario{cfg: cfg, o: o, ctx: ctx, start: time.Now(), rep: &Report{Org: o.auth.Org, Seed: cfg.Seed, Dir: cfg.Dir}}
	return s, end, nil
}

// finish times the report: it passed if it has steps and all passed.
func (s *scenario) finish() *Report {
	s.rep.Seconds = time.Since(s.start).Seconds()
	s.rep.Passed = len(s.rep.Steps) > 0
	for _, st := range s.rep.Steps {
		s.rep.Passed = s.rep.Passed && st.Passed
	}
	return s.rep
}
