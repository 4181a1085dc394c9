package cli

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"

	"github.com/spf13/cobra"
	"google.golang.org/grpc"

	"github.com/enclavekeys/enclave/internal/api"
	"github.com/enclavekeys/enclave/internal/echo"
	"github.com/enclavekeys/enclave/internal/keyserver"
	"github.com/enclavekeys/enclave/internal/visibility"
)

func newMapCmd(streams IO) *cobra.Command {
	var cf connFlags
	var out, format string
	var flows []string
	cmd := &cobra.Command{
		Use:   "map --keyserver ADDR --ca CA.crt --cert ADMIN.crt --key ADMIN.key [--flows FILE]... [--out map.html] [--format html|dot|json]",
		Short: "Draw who can read what: every enclave pair and SA, and the devices that can read it and why",
		Long: `Draw the visibility map of an organisation (DESIGN §8): for every pair of
enclaves, which devices hold a key that opens its traffic and by what right
(the org key; a pair key as an enclave key server or by a gateway's or
monitor's grant; a server key for its own SAs), and which pairs policy
forbids (no SA can form). It reads the registry from the key service (an
admin certificate). --flows FILE adds the SAs a gateway's flow log saw
(repeat for several gateways), each with who can read it.

--format html (the default) writes one self-contained page (inline SVG and
script, nothing fetched): an enclave graph, a matrix of pairs, and a
details pane per pair, device or SA; open it in a browser. dot is for
Graphviz, json for tools. --out FILE, or standard output.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			switch format {
			case "html", "dot", "json":
			default:
				return usagef("--format %q: want html, dot or json", echo.Cut(format))
			}
			var observed []visibility.Observed
			for _, f := range flows {
				o, err := readFlowSAs(f)
				if err != nil {
					return err
				}
				observed = append(observed, o...)
			}
			return cf.with(func(ctx context.Context, conn *grpc.ClientConn, creds *keyserver.Credentials) error {
				st, err := api.NewAdminClient(conn).Status(ctx, &api.StatusRequest{})
				if err != nil {
					return rpcError(err)
				}
				org := creds.Roots.Org()
				return writeMap(streams, visibility.Build(org, st, observed), format, out)
			})
		},
	}
	cf.register(cmd)
	fl := cmd.Flags()
	fl.StringVar(&out, "out", "", "write the map to this file (default: standard output)")
	fl.StringVar(&format, "format", "html", "html, dot or json")
	fl.StringArrayVar(&flows, "flows", nil, "a gateway's flow log (JSON lines) whose SAs to add (repeat)")
	return cmd
}

// writeMap writes m in format to path, or to standard output.
func writeMap(streams IO, m *visibility.Map, format, path string) error {
	var w io.Writer = streams.Out
	if path != "" {
		f, err := os.Create(path)
		if err != nil {
			return fileError(fmt.Errorf("--out: %w", err))
		}
		defer f.Close()
		w = f
	}
	var err error
	switch format {
	case "dot":
		err = m.DOT(w)
	case "json":
		err = m.JSON(w)
	default:
		err = m.HTML(w)
	}
	if err != nil {
		return failed(err)
	}
	if path != "" {
		fmt.Fprintf(streams.Err, "map written to %s (%d enclaves, %d pairs, %d SAs)\n", path, len(m.Enclaves), len(m.Pairs), len(m.SAs))
	}
	return nil
}

// readFlowSAs reads the SAs (VC and SPI) of a gateway's flow log.
func readFlowSAs(path string) ([]visibility.Observed, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fileError(fmt.Errorf("--flows: %w", err))
	}
	defer f.Close()
	seen := map[[4]uint32]bool{}
	var out []visibility.Observed
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 64<<10)
	for n := 1; sc.Scan(); n++ {
		var line struct {
			VC  string `json:"vc"`
			SPI string `json:"spi"`
		}
		bad := usagef("--flows %s line %d: not a line of a gateway's flow log", echo.Cut(path), n)
		if err := json.Unmarshal(sc.Bytes(), &line); err != nil {
			return nil, bad
		}
		parts := strings.Split(line.VC, ",")
		spi, err := strconv.ParseUint(line.SPI, 16, 32)
		if len(parts) != 3 || err != nil {
			return nil, bad
		}
		var vc [3]uint64
		for i, p := range parts {
			if vc[i], err = strconv.ParseUint(p, 10, 32); err != nil {
				return nil, bad
			}
		}
		o := visibility.Observed{Enclave: uint32(vc[0]), Peer: uint32(vc[1]), Server: uint32(vc[2]), SPI: uint32(spi)}
		if k := [4]uint32{o.Enclave, o.Peer, o.Server, o.SPI}; !seen[k] {
			seen[k] = true
			out = append(out, o)
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fileError(fmt.Errorf("--flows %s: %w", echo.Cut(path), err))
	}
	return out, nil
}
