// Package orgfile is the organisation as a reviewed file (issue 34): the
// registry's enclaves, sub-enclave layout, pair rules, devices, grants and
// sight assertions as one YAML document that operators keep in version
// control. Export writes the live registry as that file, deterministically
// (the same registry, the same bytes); Parse reads one back, refusing
// what it does not know. Secrets never go in it: no keys, no tokens.
//
// The key service applies a file (keyserver.ApplyOrg); this package reads
// and writes it.
package orgfile

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"

	"go.yaml.in/yaml/v3"

	"github.com/enclavekeys/enclave/internal/api"
	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/echo"
	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/registry"
)

// ErrFile: the org file does not parse or says something impossible.
var ErrFile = errors.New("orgfile: not a valid org file")

// File is the organisation as the file says it. Ids and pairs are written
// as operators type them: dotted under a sub-enclave layout (3.2, 3.1-7.2).
type File struct {
	Layout     string      `yaml:"layout,omitempty"`
	Enclaves   []Enclave   `yaml:"enclaves"`
	Pairs      Pairs       `yaml:"pairs"`
	Devices    []Device    `yaml:"devices"`
	Grants     []Grant     `yaml:"grants"`
	Assertions []Assertion `yaml:"assertions"`
}

// Enclave is an enclave or sub-enclave.
type Enclave struct {
	ID        string `yaml:"id"`
	Name      string `yaml:"name"`
	Addresses string `yaml:"addresses,omitempty"`
	Network   string `yaml:"network,omitempty"`
	// KeyMode is "enclave" for an enclave whose key server holds an
	// enclave key of its own (enclave-key mode), empty (or "org") for
	// keys from the org key. Level-1 enclaves only.
	KeyMode string `yaml:"key_mode,omitempty"`
}

// KeyModeEnclave is an Enclave's KeyMode in enclave-key mode.
const KeyModeEnclave = "enclave"

// Pairs are the pair rules: allowed pairs at any level, and forbidden
// ones beneath an allowed pair.
type Pairs struct {
	Allow  []string `yaml:"allow,omitempty"`
	Forbid []string `yaml:"forbid,omitempty"`
}

// Device is a registered device (one removed is not in the file; one
// whose host has not joined yet is). A device the file adds with no
// fingerprint, of a role that joins with a token (server, client,
// gateway, monitor), gets a join token when the file is applied.
type Device struct {
	Name     string  `yaml:"name"`
	Role     string  `yaml:"role"`
	Enclave  string  `yaml:"enclave,omitempty"`
	ServerID *uint32 `yaml:"server_id,omitempty"`
	Address  string  `yaml:"address,omitempty"`
	// Fingerprint pins the certificate of a device the file adds (as
	// device add --fingerprint does). The registry's pin then moves
	// with the device's renewals, so export leaves it out and a file's
	// fingerprint of a registered device is not compared.
	Fingerprint string `yaml:"fingerprint,omitempty"`
	Revoked     bool   `yaml:"revoked,omitempty"`
}

// Grant is what a gateway or monitor may read.
type Grant struct {
	Device string   `yaml:"device"`
	Pairs  []string `yaml:"pairs,omitempty"`
	All    bool     `yaml:"all,omitempty"`
}

// Assertion is a sight assertion, written as one of
//
//   - never: {reader: gw2, pair: 1-2}
//   - only: {pair: 3-7, readers: [gw-audit]}
//   - always: {reader: soc, pair: 2-3}
type Assertion struct {
	Never  *ReaderPair `yaml:"never,omitempty"`
	Only   *PairOnly   `yaml:"only,omitempty"`
	Always *ReaderPair `yaml:"always,omitempty"`
}

// ReaderPair is a never or always assertion's reader and pair.
type ReaderPair struct {
	Reader string `yaml:"reader"`
	Pair   string `yaml:"pair"`
}

// PairOnly is an only assertion's pair and readers.
type PairOnly struct {
	Pair    string   `yaml:"pair"`
	Readers []string `yaml:"readers,flow"`
}

// FromStatus is the file of a registry as the key service's Status says
// it.
func FromStatus(st *api.StatusReply) (*File, error) {
	l := keys.Layout{}
	if st.GetLayout() != "" {
		var err error
		if l, err = keys.ParseLayout(st.GetLayout()); err != nil {
			return nil, fmt.Errorf("%w: the registry's layout: %v", ErrFile, err)
		}
	}
	id := func(v uint32) string { return l.Short(keys.EnclaveID(v)) }
	pair := func(p *api.Pair) string {
		return registry.PairName(l, registry.NewPair(keys.EnclaveID(p.GetA()), keys.EnclaveID(p.GetB())))
	}
	f := &File{Enclaves: []Enclave{}, Devices: []Device{}, Grants: []Grant{}, Assertions: []Assertion{}}
	if !l.IsDefault() {
		f.Layout = l.String()
	}
	for _, e := range st.GetEnclaves() {
		en := Enclave{ID: id(e.GetId()), Name: e.GetName(), Addresses: e.GetAddresses(), Network: e.GetNetwork()}
		if e.GetEnclaveKey() {
			en.KeyMode = KeyModeEnclave
		}
		f.Enclaves = append(f.Enclaves, en)
	}
	for _, p := range st.GetPairs() {
		f.Pairs.Allow = append(f.Pairs.Allow, pair(p.GetPair()))
	}
	for _, p := range st.GetForbidden() {
		f.Pairs.Forbid = append(f.Pairs.Forbid, pair(p))
	}
	for _, d := range st.GetDevices() {
		if d.GetRemoved() {
			continue
		}
		dev := Device{Name: d.GetName(), Role: d.GetRole(), Address: d.GetOverlay(), Revoked: d.GetRevoked()}
		if d.GetEnclave() != 0 {
			dev.Enclave = id(d.GetEnclave())
		}
		if d.ServerId != nil {
			k := d.GetServerId()
			dev.ServerID = &k
		}
		f.Devices = append(f.Devices, dev)
	}
	for _, g := range st.GetGrants() {
		gr := Grant{Device: g.GetDevice(), All: g.GetAll()}
		for _, p := range g.GetPairs() {
			gr.Pairs = append(gr.Pairs, pair(p))
		}
		f.Grants = append(f.Grants, gr)
	}
	for _, a := range st.GetAssertions() {
		switch a.GetKind() {
		case registry.AssertNever:
			f.Assertions = append(f.Assertions, Assertion{Never: &ReaderPair{Reader: a.GetReader(), Pair: pair(a.GetPair())}})
		case registry.AssertAlways:
			f.Assertions = append(f.Assertions, Assertion{Always: &ReaderPair{Reader: a.GetReader(), Pair: pair(a.GetPair())}})
		case registry.AssertOnly:
			f.Assertions = append(f.Assertions, Assertion{Only: &PairOnly{Pair: pair(a.GetPair()), Readers: slices.Clone(a.GetReaders())}})
		default:
			return nil, fmt.Errorf("%w: assertion of kind %q", ErrFile, echo.Cut(a.GetKind()))
		}
	}
	f.sort()
	return f, nil
}

// sort puts the grants in one order (the registry keeps its other lists
// sorted already), so that a registry has one file.
func (f *File) sort() {
	slices.SortFunc(f.Grants, func(a, b Grant) int { return strings.Compare(a.Device, b.Device) })
}

// Marshal writes f as YAML, with a header saying what the file is.
func Marshal(f *File) ([]byte, error) {
	var b bytes.Buffer
	b.WriteString("# Enclave organisation file (enclave admin export). No secrets: keys and join tokens are never in it.\n")
	enc := yaml.NewEncoder(&b)
	enc.SetIndent(2)
	if err := enc.Encode(f); err != nil {
		return nil, err
	}
	if err := enc.Close(); err != nil {
		return nil, err
	}
	return b.Bytes(), nil
}

// Parse reads an org file; unknown keys and impossible values are errors
// that name the entry. Ids and pairs are checked under the file's layout.
func Parse(raw []byte) (*File, error) {
	var f File
	dec := yaml.NewDecoder(bytes.NewReader(raw))
	dec.KnownFields(true)
	if err := dec.Decode(&f); err != nil && !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("%w: %s", ErrFile, cutLong(err.Error()))
	}
	l := keys.Layout{}
	if f.Layout != "" {
		var err error
		if l, err = keys.ParseLayout(f.Layout); err != nil {
			return nil, fmt.Errorf("%w: layout: %v", ErrFile, err)
		}
	}
	bad := func(what string, err error) error { return fmt.Errorf("%w: %s: %v", ErrFile, what, err) }
	for i, e := range f.Enclaves {
		id, err := l.ParseID(e.ID)
		if err != nil {
			return nil, bad(fmt.Sprintf("enclave %d", i+1), err)
		}
		switch {
		case e.KeyMode != "" && e.KeyMode != "org" && e.KeyMode != KeyModeEnclave:
			return nil, bad("enclave "+echo.Cut(e.ID), fmt.Errorf("key_mode %q: want enclave (its key server's own enclave key) or org", echo.Cut(e.KeyMode)))
		case e.KeyMode == KeyModeEnclave && l.TopEnclave(id) != id:
			return nil, bad("enclave "+echo.Cut(e.ID), errors.New("key_mode: enclave-key mode is a whole enclave's, give it on its level-1 enclave"))
		}
	}
	pairs := func(what string, ps []string) error {
		for _, p := range ps {
			if _, err := registry.ParsePairIn(l, p); err != nil {
				return bad(what, err)
			}
		}
		return nil
	}
	if err := pairs("pairs: allow", f.Pairs.Allow); err != nil {
		return nil, err
	}
	if err := pairs("pairs: forbid", f.Pairs.Forbid); err != nil {
		return nil, err
	}
	seen := map[string]bool{}
	once := func(what, key string) error {
		if seen[what+"\x00"+key] {
			return fmt.Errorf("%w: %s %s is listed twice", ErrFile, what, echo.Cut(key))
		}
		seen[what+"\x00"+key] = true
		return nil
	}
	for _, e := range f.Enclaves {
		id, _ := l.ParseID(e.ID)
		if err := once("enclave", l.Short(id)); err != nil {
			return nil, err
		}
	}
	for _, d := range f.Devices {
		if err := once("device", d.Name); err != nil {
			return nil, err
		}
		if _, err := ca.ParseRole(d.Role); err != nil {
			return nil, bad("device "+echo.Cut(d.Name), err)
		}
		if d.Enclave != "" {
			if _, err := l.ParseID(d.Enclave); err != nil {
				return nil, bad("device "+echo.Cut(d.Name), err)
			}
		}
	}
	for _, g := range f.Grants {
		if err := once("grant of", g.Device); err != nil {
			return nil, err
		}
		if err := pairs("grant of "+echo.Cut(g.Device), g.Pairs); err != nil {
			return nil, err
		}
	}
	for i, a := range f.Assertions {
		n := 0
		for _, set := range []bool{a.Never != nil, a.Only != nil, a.Always != nil} {
			if set {
				n++
			}
		}
		if n != 1 {
			return nil, bad(fmt.Sprintf("assertion %d", i+1), errors.New("each is one of never, only and always"))
		}
		for _, p := range []*ReaderPair{a.Never, a.Always} {
			if p != nil {
				if err := pairs(fmt.Sprintf("assertion %d", i+1), []string{p.Pair}); err != nil {
					return nil, err
				}
			}
		}
		if a.Only != nil {
			if err := pairs(fmt.Sprintf("assertion %d", i+1), []string{a.Only.Pair}); err != nil {
				return nil, err
			}
		}
	}
	// Every section is there, if only empty: a file cut short (a bad
	// merge, a paste) must not read as "no devices, no assertions".
	var top map[string]yaml.Node
	if err := yaml.Unmarshal(raw, &top); err != nil {
		return nil, fmt.Errorf("%w: %s", ErrFile, cutLong(err.Error()))
	}
	for _, section := range []string{"enclaves", "pairs", "devices", "grants", "assertions"} {
		if _, ok := top[section]; !ok {
			return nil, fmt.Errorf("%w: the file has no %s: section (a file cut short?); write %s: [] for none", ErrFile, section, section)
		}
	}
	return &f, nil
}

// cutLong shortens a parser's message for the terminal, keeping enough
// of it to say the line and the field.
func cutLong(s string) string {
	if len(s) > 600 {
		return s[:600] + "..."
	}
	return s
}
