package cli

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/grpc"

	"github.com/enclavekeys/enclave/internal/api"
	"github.com/enclavekeys/enclave/internal/echo"
	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/keyserver"
	"github.com/enclavekeys/enclave/internal/registry"
	"github.com/enclavekeys/enclave/internal/visibility"
)

func newMapCmd(streams IO) *cobra.Command {
	var cf connFlags
	var out, format string
	var flows, noDerive, statuses []string
	var diff bool
	var window time.Duration
	var keyMode, whatIf []uint
	cmd := &cobra.Command{
		Use:   "map --keyserver ADDR --ca CA.crt --cert ADMIN.crt --key ADMIN.key [--flows [NAME=]FILE]... [--status SOCKET]... [--window 15m] [--out map.html] [--format html|dot|json] [--what-if-enclave-key-mode J] | map --diff A.json B.json [--format html|text|json]",
		Short: "Draw who can read what: every enclave pair and SA, and the devices that can read it and why",
		Long: `Draw the visibility map of an organisation (DESIGN §8): for every pair of
enclaves, which devices hold a key that opens its traffic and by what right
(the org key; a pair key as an enclave key server or by a gateway's or
monitor's grant; a server key for its own SAs), and which pairs policy
forbids (no SA can form). It reads the registry from the key service (an
admin certificate). --flows FILE adds the SAs a gateway's flow log saw
(repeat for several gateways), each with who can read it.

Can read, and did read: --flows (its lines name their gateway; NAME=FILE
names it for older logs) and --status SOCKET (a running agent's or
gateway's status socket, as enclave status reads it) tell what those
devices read of each pair in the --window before now (default 15m). The
page shows beside each reader what it read, and lists the readers by
grant that are reported but read nothing of a pair: candidates to take
the grant from. A reader not reported is not judged.

--format html (the default) writes one self-contained page (inline SVG and
script, nothing fetched): an enclave graph with the readers beside it
grouped and coloured by right (point at one to light up what it reads), a
matrix of pairs with their readers counted by right, and a details pane
per pair, device or SA; open it in a browser. dot is for
Graphviz, json for tools. --out FILE, or standard output.

The registry cannot say two things the map depends on: which enclaves'
key servers hold an enclave key of their own (--enclave-key-mode I,J:
org key holders, monitors and grants read none of those enclaves' pairs)
and which gateways run --no-derive (--no-derive NAME: they read only SAs
whose keys were handed to them).

--diff A.json B.json draws what changes from one map (--format json) to
another: who gains and who loses sight of which pairs, pairs allowed,
forbidden and rotated; as a page (html), a list (text) or json. Maps made
before and after a change answer "what if" for anything the admin
commands' --dry-run does not cover.

--what-if-enclave-key-mode J is the dry run of moving enclave J's key
server to an enclave key of its own (enclave keyserver --tier enclave
--enclave-key-file): it prints (--format text, the default here; html or
json) who would lose sight of J's pairs, as --diff of the two maps would.`,
		Args: func(cmd *cobra.Command, args []string) error {
			if diff && len(args) != 2 {
				return usagef("--diff takes two maps: --diff A.json B.json")
			}
			if !diff && len(args) > 0 {
				return usagef("unexpected argument %q (two maps go with --diff)", echo.Cut(args[0]))
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			if diff {
				return writeMapDiff(streams, args[0], args[1], format, out)
			}
			if len(whatIf) > 0 && !cmd.Flags().Changed("format") {
				format = "text"
			}
			switch {
			case format == "html" || format == "json" || format == "dot" && len(whatIf) == 0 || format == "text" && len(whatIf) > 0:
			default:
				return usagef("--format %q: want html, dot or json (html, text or json with --what-if-enclave-key-mode)", echo.Cut(format))
			}
			opt := visibility.Options{NoDerive: noDerive}
			then := visibility.Options{NoDerive: noDerive}
			for _, e := range whatIf {
				if e == 0 || e > 0xffff {
					return usagef("--what-if-enclave-key-mode %d: an enclave id is 1 to 65535", e)
				}
				then.EnclaveKeyMode = append(then.EnclaveKeyMode, uint32(e))
			}
			for _, e := range keyMode {
				if e == 0 || e > 0xffff {
					return usagef("--enclave-key-mode %d: an enclave id is 1 to 65535", e)
				}
				opt.EnclaveKeyMode = append(opt.EnclaveKeyMode, uint32(e))
				then.EnclaveKeyMode = append(then.EnclaveKeyMode, uint32(e))
			}
			var observed []visibility.Observed
			var sources []*flowSource
			for _, f := range flows {
				src, err := readFlows(f)
				if err != nil {
					return err
				}
				sources = append(sources, src)
			}
			if window <= 0 {
				return usagef("--window %v: want a positive duration, as 15m", window)
			}
			return cf.with(func(ctx context.Context, conn *grpc.ClientConn, creds *keyserver.Credentials) error {
				st, err := api.NewAdminClient(conn).Status(ctx, &api.StatusRequest{})
				if err != nil {
					return rpcError(err)
				}
				org := creds.Roots.Org()
				var reads []visibility.Read
				var reported []string
				for _, src := range sources {
					if err := src.check(statusLayout(st)); err != nil {
						return err
					}
					observed = append(observed, src.observed...)
					reads, reported = append(reads, src.reads...), append(reported, src.gateways...)
				}
				for _, path := range statuses {
					name, r, err := statusReads(ctx, path)
					if err != nil {
						return err
					}
					reads, reported = append(reads, r...), append(reported, name)
				}
				m := visibility.Build(org, st, observed, opt)
				if len(whatIf) > 0 {
					return writeDiff(streams, m, visibility.Build(org, st, observed, then), format, out)
				}
				if len(reported) > 0 {
					m.AddReads(time.Now(), window, reported, reads)
				}
				return writeMap(streams, m, format, out)
			})
		},
	}
	cf.register(cmd)
	fl := cmd.Flags()
	fl.StringVar(&out, "out", "", "write the map to this file (default: standard output)")
	fl.StringVar(&format, "format", "html", "html, dot or json")
	fl.StringArrayVar(&flows, "flows", nil, "[NAME=]FILE: a gateway's flow log (JSON lines): its SAs, and what the gateway read (repeat)")
	fl.StringArrayVar(&statuses, "status", nil, "a running agent's or gateway's status socket: what it read (repeat)")
	fl.DurationVar(&window, "window", 15*time.Minute, "with --flows or --status: the reads that count, before now")
	fl.UintSliceVar(&keyMode, "enclave-key-mode", nil, "enclaves whose key servers hold their own enclave key (I,J)")
	fl.UintSliceVar(&whatIf, "what-if-enclave-key-mode", nil, "a dry run: print what changes if these enclaves' key servers took their own enclave keys (J,K)")
	fl.StringSliceVar(&noDerive, "no-derive", nil, "gateways that run --no-derive (NAME,NAME)")
	fl.BoolVar(&diff, "diff", false, "compare two maps given as arguments: A.json B.json")
	return cmd
}

// writeMapDiff writes what changes from map file a to map file b.
func writeMapDiff(streams IO, a, b, format, path string) error {
	if format == "dot" {
		return usagef("--diff --format %q: want html, text or json", format)
	}
	var maps [2]*visibility.Map
	for i, name := range []string{a, b} {
		f, err := os.Open(name)
		if err != nil {
			return usageError(err)
		}
		maps[i], err = visibility.ReadMap(f)
		f.Close()
		if err != nil {
			return usageError(fmt.Errorf("%s: %w", echo.Cut(name), err))
		}
	}
	return writeDiff(streams, maps[0], maps[1], format, path)
}

// writeDiff writes what changes from map a to map b, as a page (html), a
// list (text) or json.
func writeDiff(streams IO, a, b *visibility.Map, format, path string) error {
	var write func(io.Writer) error
	switch format {
	case "html":
		write = func(w io.Writer) error { return visibility.DiffHTML(w, a, b) }
	case "text":
		write = visibility.Compare(a, b).Text
	case "json":
		write = func(w io.Writer) error {
			enc := json.NewEncoder(w)
			enc.SetIndent("", "  ")
			return enc.Encode(visibility.Compare(a, b))
		}
	default:
		return usagef("--diff --format %q: want html, text or json", echo.Cut(format))
	}
	if err := writeOut(streams, path, write); err != nil {
		return err
	}
	if path != "" {
		fmt.Fprintf(streams.Err, "diff written to %s\n", path)
	}
	return nil
}

// writeOut runs write on the file at path (--out), or on standard output.
func writeOut(streams IO, path string, write func(io.Writer) error) error {
	if path == "" {
		if err := write(streams.Out); err != nil {
			return failed(err)
		}
		return nil
	}
	f, err := os.Create(path)
	if err != nil {
		return fileError(fmt.Errorf("--out: %w", err))
	}
	if err := errors.Join(write(f), f.Close()); err != nil {
		return failed(err)
	}
	return nil
}

// writeMap writes m in format to path, or to standard output.
func writeMap(streams IO, m *visibility.Map, format, path string) error {
	write := m.HTML
	switch format {
	case "dot":
		write = m.DOT
	case "json":
		write = m.JSON
	}
	if err := writeOut(streams, path, write); err != nil {
		return err
	}
	if path != "" {
		fmt.Fprintf(streams.Err, "map written to %s (%d enclaves, %d pairs, %d SAs)\n", path, len(m.Enclaves), len(m.Pairs), len(m.SAs))
	}
	return nil
}

// flowSource is what a gateway's flow log says: the SAs its flows were
// in, and what the gateway read of each pair.
type flowSource struct {
	observed []visibility.Observed
	reads    []visibility.Read
	gateways []string // the gateways that wrote it (from its lines, or NAME=)
	// vcPairs are the pairs the reads' VCs name, and where from, to check
	// each read's pair against once the org's layout is known (check).
	vcPairs []registry.Pair
	where   []string
}

// check holds each read's pair to its VC's under the org's layout l (a
// gateway writes pairs dotted under a sub-enclave layout: 3.1-7.2, or
// plain numbers), and names it as the map does.
func (f *flowSource) check(l keys.Layout) error {
	for i := range f.reads {
		p := f.vcPairs[i]
		name := registry.PairName(l, p)
		if f.reads[i].Pair != name && f.reads[i].Pair != p.String() {
			return usagef("%s: pair %q, but its VC is of pair %s", f.where[i], echo.Cut(f.reads[i].Pair), name)
		}
		f.reads[i].Pair = name
	}
	return nil
}

// readFlows reads a gateway's flow log given as [NAME=]FILE: NAME names
// the gateway for lines that do not (logs written before lines did).
func readFlows(arg string) (*flowSource, error) {
	name, path := "", arg
	if k, v, ok := strings.Cut(arg, "="); ok && !strings.ContainsAny(k, "/.") {
		name, path = k, v
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, fileError(fmt.Errorf("--flows: %w", err))
	}
	defer f.Close()
	seen := map[[4]uint32]bool{}
	out := &flowSource{}
	owner, now := name, time.Now()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 64<<10)
	for n := 1; sc.Scan(); n++ {
		var line struct {
			Gateway string    `json:"gateway"`
			VC      string    `json:"vc"`
			SPI     string    `json:"spi"`
			Pair    string    `json:"pair"`
			Bytes   uint64    `json:"bytes"`
			Last    time.Time `json:"last"`
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
			out.observed = append(out.observed, o)
		}
		// One file, one gateway: NAME= names it, or its first line that
		// names one; a line naming another is refused (it would credit or
		// spare a gateway the file is not about).
		if line.Gateway != "" {
			if owner == "" {
				owner = line.Gateway
			}
			if line.Gateway != owner {
				return nil, usagef("--flows %s line %d: written by gateway %q, but the file is %q's: one flow log per gateway", echo.Cut(path), n, echo.Cut(line.Gateway), echo.Cut(owner))
			}
		}
		if owner == "" || line.Pair == "" {
			continue // an SA seen, by a gateway not named
		}
		if vc[0] == 0 || vc[1] == 0 || vc[0] > 0xffff || vc[1] > 0xffff {
			return nil, bad
		}
		if line.Last.After(now.Add(clockSkew)) {
			return nil, usagef("--flows %s line %d: its last packet is in the future (%s): a clock off, or a line made up", echo.Cut(path), n, line.Last.UTC().Format(time.RFC3339))
		}
		if !slices.Contains(out.gateways, owner) {
			out.gateways = append(out.gateways, owner)
		}
		out.reads = append(out.reads, visibility.Read{Device: owner, Pair: line.Pair, Bytes: line.Bytes, Last: line.Last, Source: "flow log " + path})
		out.vcPairs = append(out.vcPairs, registry.NewPair(keys.EnclaveID(vc[0]), keys.EnclaveID(vc[1])))
		out.where = append(out.where, fmt.Sprintf("--flows %s line %d", echo.Cut(path), n))
	}
	if err := sc.Err(); err != nil {
		return nil, fileError(fmt.Errorf("--flows %s: %w", echo.Cut(path), err))
	}
	if name != "" && !slices.Contains(out.gateways, name) {
		out.gateways = append(out.gateways, name) // reported, whether or not it read
	}
	return out, nil
}

// clockSkew is how far in the future a reported read's last packet may
// be (the reporter's clock against this one).
const clockSkew = 5 * time.Minute

// statusReads asks a running agent's or gateway's status socket what it
// read: an agent the SAs it received on (their pair is the VC's i-j), a
// gateway its live flows by pair.
func statusReads(ctx context.Context, path string) (string, []visibility.Read, error) {
	r, err := fetchStatus(ctx, path)
	if err != nil {
		return "", nil, failed(fmt.Errorf("--status %s: %w", echo.Cut(path), err))
	}
	var out []visibility.Read
	switch {
	case r.Agent != nil:
		for _, p := range r.Agent.Peers {
			for _, sa := range p.SAs {
				i, rest, _ := strings.Cut(sa.VC, ",")
				j, _, _ := strings.Cut(rest, ",")
				a, errA := strconv.ParseUint(i, 10, 16)
				b, errB := strconv.ParseUint(j, 10, 16)
				if errA != nil || errB != nil {
					continue
				}
				out = append(out, visibility.Read{Device: r.Agent.Name, Pair: fmt.Sprintf("%d-%d", min(a, b), max(a, b)), Bytes: sa.RxBytes, Last: capFuture(sa.LastRecv), Source: "status " + path})
			}
		}
		return r.Agent.Name, out, nil
	case r.Gateway != nil:
		for pair, pr := range r.Gateway.Reads {
			out = append(out, visibility.Read{Device: r.Gateway.Name, Pair: pair, Bytes: pr.Bytes, Last: capFuture(pr.Last), Source: "status " + path})
		}
		return r.Gateway.Name, out, nil
	}
	return "", nil, failed(fmt.Errorf("--status %s: neither an agent's nor a gateway's status", echo.Cut(path)))
}

// capFuture keeps a status answer's time from the future (a read that
// never ages out of the window): past clockSkew, it counts as now.
func capFuture(t time.Time) time.Time {
	if now := time.Now(); t.After(now.Add(clockSkew)) {
		return now
	}
	return t
}
