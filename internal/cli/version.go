package cli

import (
	"encoding/json"
	"fmt"
	"runtime"
	"runtime/debug"

	"github.com/spf13/cobra"
)

// buildInfo reads the module version and VCS revision the binary was built
// with (go build stamps them; a build without VCS information, as with
// -buildvcs=false, has none).
type buildInfo struct {
	Version  string `json:"version"`
	Revision string `json:"revision,omitempty"`
	Time     string `json:"time,omitempty"`
	Modified bool   `json:"modified,omitempty"`
	Go       string `json:"go"`
}

func readBuildInfo() buildInfo {
	b := buildInfo{Version: "(unknown)", Go: runtime.Version()}
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return b
	}
	if bi.Main.Version != "" {
		b.Version = bi.Main.Version
	}
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			b.Revision = s.Value
		case "vcs.time":
			b.Time = s.Value
		case "vcs.modified":
			b.Modified = s.Value == "true"
		}
	}
	return b
}

// String is the one line `enclave version` and --version print.
func (b buildInfo) String() string {
	s := "enclave " + b.Version
	switch {
	case b.Revision == "":
		s += " (no VCS revision: built outside a checkout or with -buildvcs=false)"
	default:
		s += " (revision " + b.Revision
		if b.Time != "" {
			s += ", " + b.Time
		}
		if b.Modified {
			s += ", with uncommitted changes"
		}
		s += ")"
	}
	return s + " " + b.Go
}

func newVersionCmd(streams IO) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "version [--json]",
		Short: "Print the version and VCS revision this binary was built from",
		Long: `Print the module version and the VCS revision (commit, its time, and
whether the tree had uncommitted changes) this binary was built from, and the
Go release that built it. enclave --version prints the same line.

Example:
  enclave version
  enclave version --json`,
		Args: noArgs,
		RunE: func(*cobra.Command, []string) error {
			b := readBuildInfo()
			if asJSON {
				return json.NewEncoder(streams.Out).Encode(b)
			}
			_, err := fmt.Fprintln(streams.Out, b.String())
			return err
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print as JSON")
	return cmd
}
