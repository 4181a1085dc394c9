package cli

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/spf13/cobra"

	"github.com/enclavekeys/enclave/internal/echo"
	"github.com/enclavekeys/enclave/internal/fileread"
	"github.com/enclavekeys/enclave/internal/keys"
)

func newKeysCmd(streams IO) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "keys",
		Short: "Generate and derive keys of the hierarchy",
	}
	cmd.AddCommand(newKeysGenerateCmd(streams), newKeysDeriveCmd(streams), newKeysFetchCmd(streams))
	return cmd
}

func newKeysGenerateCmd(streams IO) *cobra.Command {
	var out string
	cmd := &cobra.Command{
		Use:   "generate",
		Short: "Print a fresh random 256-bit key in hex",
		Long: `Print a fresh random 256-bit key (an org key, or an enclave key E_i) as 64
lowercase hex digits. With --out the key goes to a new file of mode 0600
instead, so that it never appears on a terminal.`,
		Args: noArgs,
		RunE: func(*cobra.Command, []string) error {
			var k keys.Key
			defer k.Zero()
			if _, err := rand.Read(k[:]); err != nil {
				return failed(fmt.Errorf("reading randomness: %w", err))
			}
			line := k.Hex() + "\n"
			if out == "" {
				_, err := fmt.Fprint(streams.Out, line)
				return err
			}
			f, err := os.OpenFile(out, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
			if err != nil {
				return failed(fmt.Errorf("--out: %w (an existing key file is never overwritten)", err))
			}
			if _, err := f.WriteString(line); err != nil {
				f.Close()
				return failed(fmt.Errorf("--out: %w", err))
			}
			if err := f.Close(); err != nil {
				return failed(fmt.Errorf("--out: %w", err))
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&out, "out", "", "write the key to this new file (mode 0600) instead of stdout")
	return cmd
}

// deriveFlags are the inputs of keys derive, as given.
type deriveFlags struct {
	orgKey, pairKey, serverKey string
	enclaves                   string
	generation                 string
	server                     string
	spi                        string
	version                    string
	json                       bool
	layout, level              string
}

// levelPairKey is one level's pair key EK_L.
type levelPairKey struct {
	Level int    `json:"level"`
	Key   string `json:"key"`
}

// deriveOutput is the --json form: the levels that were derived.
type deriveOutput struct {
	// Layout and PairKeys are given with --layout: every level's pair
	// key derived, EK_1 first.
	Layout    string         `json:"layout,omitempty"`
	PairKeys  []levelPairKey `json:"pair_keys,omitempty"`
	PairKey   string         `json:"pair_key,omitempty"`
	ServerKey string         `json:"server_key,omitempty"`
	SAKey     string         `json:"sa_key,omitempty"`
}

func newKeysDeriveCmd(streams IO) *cobra.Command {
	var f deriveFlags
	cmd := &cobra.Command{
		Use:   "derive (--org-key K --generation G | --pair-key K | --server-key K) [flags]",
		Short: "Derive pair, server and SA keys from a key you hold",
		Long: `Derive the keys beneath a key of the hierarchy (DESIGN §3) and print the lowest
one reached, in lowercase hex, on one line.

Start from exactly one of:
  --org-key K     the org key; needs --generation and --enclaves
  --pair-key K    an enclave-pair key EK(i,j,g); needs --enclaves and --server
  --server-key K  a server key SK(i,j,k,g); needs --spi
K is 64 hex digits, or @FILE to read them from a file (keeps keys out of
shell history and the process list).

--enclaves I,J   I is the server's enclave, J the peer's (the pair key does
                 not depend on the order; the server key does)
--server K       the server id, to go below the pair level
--spi HEX        8 hex digits as on the wire (e.g. 80001234), to reach the SA
                 level; bit 31 must equal the generation's parity when the
                 generation is given
--psp-version    0 (AES-128-GCM, 128-bit key) or 1 (AES-256-GCM, default)

Sub-enclave levels (DESIGN §3a): --layout W1.W2... (bit widths summing to
16; default 16, one level) makes --enclaves dotted (with 8.8, 3.2,7.1) and
derives the pair key of every level, EK_1 to EK_D, before the server key.
--level L stops at EK_L (with --org-key), or says --pair-key is EK_L.`,
		Example: `  enclave keys derive --org-key 000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f \
      --enclaves 3,7 --generation 1 --server 258 --spi 80001234
  9bd253cc0a1a23bb1960342d4073736a70e5ac3eb0bb0ba7924bac4dea4c800e
  enclave keys derive --org-key @org.key --layout 8.8 --enclaves 3.2,7.1 --generation 1 --server 258 --spi 80001234 --json`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			out, err := runDerive(cmd, &f)
			if err != nil {
				return err
			}
			if f.json {
				enc := json.NewEncoder(streams.Out)
				return enc.Encode(out)
			}
			lowest := out.SAKey
			if lowest == "" {
				lowest = out.ServerKey
			}
			if lowest == "" {
				lowest = out.PairKey
			}
			_, err = fmt.Fprintln(streams.Out, lowest)
			return err
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&f.orgKey, "org-key", "", "start from the org key (hex or @FILE)")
	fl.StringVar(&f.pairKey, "pair-key", "", "start from an enclave-pair key (hex or @FILE)")
	fl.StringVar(&f.serverKey, "server-key", "", "start from a server key (hex or @FILE)")
	fl.StringVar(&f.enclaves, "enclaves", "", "I,J: the server's enclave and the peer's")
	fl.StringVar(&f.generation, "generation", "", "the pair's generation (required with --org-key)")
	fl.StringVar(&f.server, "server", "", "the server id k")
	fl.StringVar(&f.spi, "spi", "", "the SPI as 8 hex digits, e.g. 80001234")
	fl.StringVar(&f.version, "psp-version", "1", "PSP version: 0 (AES-128-GCM) or 1 (AES-256-GCM)")
	fl.BoolVar(&f.json, "json", false, "print a JSON object with every level derived")
	fl.StringVar(&f.layout, "layout", "16", "the org's sub-enclave layout, bit widths as 8.8 (DESIGN §3a)")
	fl.StringVar(&f.level, "level", "", "with --layout: stop at EK_L (--org-key), or --pair-key is EK_L (default: the deepest)")
	return cmd
}

// runDerive validates the flags and walks down the hierarchy. Every input
// problem is a usage error (exit 2).
func runDerive(cmd *cobra.Command, f *deriveFlags) (*deriveOutput, error) {
	fl := cmd.Flags()
	var start []string
	for _, name := range []string{"org-key", "pair-key", "server-key"} {
		if fl.Changed(name) {
			start = append(start, "--"+name)
		}
	}
	switch len(start) {
	case 0:
		return nil, usagef("give the key to start from: one of --org-key, --pair-key, --server-key")
	case 2, 3:
		return nil, usagef("give only one key to start from, not %s", strings.Join(start, " and "))
	}
	level := map[string]keys.Level{"--org-key": keys.LevelOrg, "--pair-key": keys.LevelPair, "--server-key": keys.LevelServer}[start[0]]

	layout, err := keys.ParseLayout(f.layout)
	if err != nil {
		return nil, usagef("--layout: %w", err)
	}
	pairLevel := layout.Levels() // the pair key level given or stopped at
	if fl.Changed("level") {
		n, err := strconv.Atoi(f.level)
		if err != nil || n < 1 || n > layout.Levels() {
			return nil, usagef("--level %q: want 1 to %d (layout %s)", echo.Cut(f.level), layout.Levels(), layout)
		}
		if level == keys.LevelServer {
			return nil, usagef("--level names a pair-key level: not with --server-key")
		}
		pairLevel = n
	}
	var (
		vc                   keys.VC
		g                    keys.Generation
		hasGen, hasEnc, hasK bool
		spi                  keys.SPI
		hasSPI               bool
		version              = keys.PSPv1
	)
	if fl.Changed("enclaves") {
		if vc.Enclave, vc.Peer, err = parseEnclavePair(layout, f.enclaves); err != nil {
			return nil, usageError(err)
		}
		hasEnc = true
	}
	if fl.Changed("generation") {
		if g, err = keys.ParseGeneration(f.generation); err != nil {
			return nil, usagef("--generation: %w", err)
		}
		hasGen = true
	}
	if fl.Changed("server") {
		if vc.Server, err = keys.ParseServerID(f.server); err != nil {
			return nil, usagef("--server: %w", err)
		}
		hasK = true
	}
	if fl.Changed("spi") {
		if spi, err = keys.ParseSPI(f.spi); err != nil {
			return nil, usagef("--spi: %w", err)
		}
		hasSPI = true
	}
	if version, err = keys.ParseVersion(f.version); err != nil {
		return nil, usagef("--psp-version: %w", err)
	}
	if fl.Changed("psp-version") && !hasSPI {
		return nil, usagef("--psp-version applies only with --spi")
	}
	if hasGen && hasSPI && spi.Parity() != g.Parity() {
		return nil, usagef("--spi %s has parity bit %d but generation %d has parity %d: %w", spi, spi.Parity(), g, g.Parity(), keys.ErrParity)
	}

	switch level {
	case keys.LevelOrg:
		if !hasGen {
			return nil, usagef("--org-key needs --generation")
		}
		if !hasEnc {
			return nil, usagef("--org-key needs --enclaves I,J")
		}
	case keys.LevelPair:
		if !hasEnc {
			return nil, usagef("--pair-key needs --enclaves I,J")
		}
		if !hasK && pairLevel == layout.Levels() {
			return nil, usagef("--pair-key needs --server K (the pair key is already the level it gives)")
		}
	case keys.LevelServer:
		if hasEnc || hasK {
			return nil, usagef("--enclaves and --server do not apply to --server-key: the server key already fixes i, j and k")
		}
		if !hasSPI {
			return nil, usagef("--server-key needs --spi")
		}
	}
	if hasSPI && level != keys.LevelServer && !hasK {
		return nil, usagef("--spi needs --server K to go from the pair level to the SA level")
	}

	root, err := readKeyFlag(start[0], map[keys.Level]string{keys.LevelOrg: f.orgKey, keys.LevelPair: f.pairKey, keys.LevelServer: f.serverKey}[level])
	if err != nil {
		return nil, usageError(err)
	}
	defer root.Zero()

	out := &deriveOutput{}
	var ek, sk keys.Key
	defer ek.Zero()
	defer sk.Zero()
	if fl.Changed("layout") {
		out.Layout = layout.String()
	}
	switch level {
	case keys.LevelOrg:
		if ek, err = keys.PairKeyAt(&root, layout, 1, vc.Enclave, vc.Peer, g); err != nil {
			return nil, usageError(err)
		}
		out.PairKey = ek.Hex()
		if fl.Changed("layout") {
			out.PairKeys = append(out.PairKeys, levelPairKey{1, ek.Hex()})
		}
		if err := deriveLevels(&ek, layout, 2, pairLevelStop(fl.Changed("level"), pairLevel, layout), vc, out, fl.Changed("layout")); err != nil {
			return nil, usageError(err)
		}
	case keys.LevelPair:
		ek = root
		if err := deriveLevels(&ek, layout, pairLevel+1, layout.Levels(), vc, out, fl.Changed("layout")); err != nil {
			return nil, usageError(err)
		}
	case keys.LevelServer:
		sk = root
	}
	if fl.Changed("level") && level == keys.LevelOrg && pairLevel < layout.Levels() {
		if hasK || hasSPI {
			return nil, usagef("--level %d stops at a pair key: --server and --spi go below the deepest level", pairLevel)
		}
		return out, nil
	}
	if hasK {
		if sk, err = keys.ServerKey(&ek, vc); err != nil {
			return nil, usageError(err)
		}
		out.ServerKey = sk.Hex()
	}
	if hasSPI {
		ck, err := keys.SAKeyFromServer(&sk, spi, version)
		if err != nil {
			return nil, usageError(err)
		}
		out.SAKey = ck.Hex()
		ck.Zero()
	}
	return out, nil
}

// parseEnclavePair parses "I,J", ids dotted under layout l (the default:
// plain numbers).
func parseEnclavePair(l keys.Layout, text string) (keys.EnclaveID, keys.EnclaveID, error) {
	a, b, ok := strings.Cut(text, ",")
	if !ok {
		how := ""
		if !l.IsDefault() {
			how = fmt.Sprintf(" (dotted under --layout %s, as 3.2,7.1)", l)
		}
		return 0, 0, fmt.Errorf("--enclaves %q: want two enclave ids as I,J%s", echo.Cut(text), how)
	}
	i, err := l.ParseID(a)
	if err != nil {
		return 0, 0, fmt.Errorf("--enclaves %q: %w", echo.Cut(text), err)
	}
	j, err := l.ParseID(b)
	if err != nil {
		return 0, 0, fmt.Errorf("--enclaves %q: %w", echo.Cut(text), err)
	}
	return i, j, nil
}

// readKeyFlag parses a 256-bit key given as hex or as @FILE. Its messages
// never echo the key text.
func readKeyFlag(flag, value string) (keys.Key, error) {
	text, err := flagText(flag, value)
	if err != nil {
		return keys.Key{}, err
	}
	k, err := keys.ParseKey(text)
	if err != nil {
		return keys.Key{}, fmt.Errorf("%s: %w", flag, err)
	}
	return k, nil
}

// readHexFlag parses hex bytes of one of the given lengths, given as hex or
// as @FILE (SA keys are 16 or 32 bytes). Its messages never echo the text.
func readHexFlag(flag, value string, lengths ...int) ([]byte, error) {
	text, err := flagText(flag, value)
	if err != nil {
		return nil, err
	}
	b, err := hex.DecodeString(strings.TrimSpace(text))
	if err != nil {
		return nil, fmt.Errorf("%s: not hex", flag)
	}
	for _, n := range lengths {
		if len(b) == n {
			return b, nil
		}
	}
	clear(b)
	return nil, fmt.Errorf("%s: %d bytes, want %s", flag, len(b), joinInts(lengths, " or "))
}

// flagText is value itself, or the contents of FILE for "@FILE".
func flagText(flag, value string) (string, error) {
	path, ok := strings.CutPrefix(value, "@")
	if !ok {
		return value, nil
	}
	b, err := fileread.Bounded(path, fileread.MaxKey)
	if err != nil {
		return "", fmt.Errorf("%s: %w", flag, err)
	}
	text := string(b)
	clear(b)
	return text, nil
}

func joinInts(ns []int, sep string) string {
	parts := make([]string, len(ns))
	for i, n := range ns {
		parts[i] = strconv.Itoa(n)
	}
	return strings.Join(parts, sep)
}

// pairLevelStop is the last level the org key's walk derives.
func pairLevelStop(given bool, level int, l keys.Layout) int {
	if given {
		return level
	}
	return l.Levels()
}

// deriveLevels walks ek from the level above from down to level to,
// recording each level's key (with show) and leaving the last in ek.
func deriveLevels(ek *keys.Key, l keys.Layout, from, to int, vc keys.VC, out *deriveOutput, show bool) error {
	for L := from; L <= to; L++ {
		next, err := keys.SubPairKey(ek, l, L, L, vc.Enclave, vc.Peer)
		if err != nil {
			return err
		}
		ek.Zero()
		*ek = next
		out.PairKey = ek.Hex()
		if show {
			out.PairKeys = append(out.PairKeys, levelPairKey{L, ek.Hex()})
		}
	}
	return nil
}
