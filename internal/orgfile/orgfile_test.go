package orgfile

import (
	"bytes"
	"errors"
	"strings"
	"testing"

	"github.com/enclavekeys/enclave/internal/api"
)

func u32(v uint32) *uint32 { return &v }

// everything is a registry's status with every kind of entry, under
// layout 8.8.
func everything() *api.StatusReply {
	id := func(a, b uint32) uint32 { return a<<8 | b }
	pair := func(a, b uint32) *api.Pair { return &api.Pair{A: a, B: b} }
	return &api.StatusReply{
		Layout: "8.8",
		Enclaves: []*api.Enclave{{Id: id(3, 0), Name: "corp", Addresses: "100.64.3.0/24", Network: "100.64.0.0/16"}, {Id: id(3, 1), Name: "web"},
			{Id: id(3, 2), Name: "db"}, {Id: id(7, 0), Name: "fin", EnclaveKey: true}},
		Devices: []*api.Device{
			{Name: "audit", Role: "gateway", Enclave: id(7, 0)},
			{Name: "gone", Role: "client", Enclave: id(7, 0), Revoked: true, Removed: true},
			{Name: "joining", Role: "server", Enclave: id(3, 1), ServerId: u32(99), Pending: true},
			{Name: "old", Role: "client", Enclave: id(7, 0), Revoked: true},
			{Name: "soc", Role: "monitor"},
			{Name: "web1", Role: "server", Enclave: id(3, 1), ServerId: u32(31), Overlay: "100.64.3.1/16", Fingerprint: "sha256:ab"},
		},
		Pairs:     []*api.PairStatus{{Pair: pair(id(3, 0), id(7, 0)), Generation: 4}},
		Forbidden: []*api.Pair{pair(id(3, 1), id(7, 0))},
		Grants:    []*api.Grant{{Device: "soc", All: true}, {Device: "audit", Pairs: []*api.Pair{pair(id(3, 2), id(7, 0))}}},
		Assertions: []*api.Assertion{
			{Kind: "never", Reader: "role:gateway", Pair: pair(id(3, 1), id(7, 0))},
			{Kind: "only", Pair: pair(id(3, 2), id(7, 0)), Readers: []string{"audit", "soc"}},
			{Kind: "always", Reader: "soc", Pair: pair(id(3, 0), id(7, 0))},
		},
	}
}

// TestRoundTrip: a registry's file reads back to the same bytes; it
// names ids dotted, leaves out removed and unconfirmed devices and every
// secret, and writes assertions as the issue does.
func TestRoundTrip(t *testing.T) {
	f, err := FromStatus(everything())
	if err != nil {
		t.Fatal(err)
	}
	raw, err := Marshal(f)
	if err != nil {
		t.Fatal(err)
	}
	back, err := Parse(raw)
	if err != nil {
		t.Fatalf("%v\n%s", err, raw)
	}
	again, _ := Marshal(back)
	if !bytes.Equal(raw, again) {
		t.Fatalf("the file does not read back to itself:\n%s\n---\n%s", raw, again)
	}
	text := string(raw)
	for _, want := range []string{"layout: \"8.8\"", "id: \"3.1\"", "- 3-7\n", "- 3.1-7\n", "enclave: \"3.1\"", "server_id: 31", "address: 100.64.3.1/16",
		"revoked: true", "name: joining", "key_mode: enclave", "all: true", "never:\n      reader: role:gateway", "readers: [audit, soc]"} {
		if !strings.Contains(text, want) {
			t.Errorf("the file lacks %q:\n%s", want, text)
		}
	}
	for _, not := range []string{"gone", "generation", "pending"} { // a device awaiting its host is in the file, as any other
		if strings.Contains(text, not) {
			t.Errorf("the file has %q:\n%s", not, text)
		}
	}
}

// TestParseRefuses: what the file cannot mean is refused, naming where.
func TestParseRefuses(t *testing.T) {
	for _, c := range []struct{ name, body, want string }{
		{"unknown key", "enclaves: []\ncolour: blue\n", "colour"},
		{"bad layout", "layout: 8.9\n", "layout"},
		{"a file cut short", "enclaves: []\npairs: {}\n", "no devices: section"},
		{"a device twice", "enclaves: []\ndevices: [{name: a, role: client}, {name: a, role: client}]\n", "device a is listed twice"},
		{"a role mistyped", "enclaves: []\ndevices: [{name: a, role: monitr}]\n", "monitr"},
		{"bad key mode", "enclaves: [{id: \"3\", name: web, key_mode: own}]\n", "key_mode"},
		{"key mode of a sub-enclave", "layout: \"8.8\"\nenclaves: [{id: \"3.1\", name: web, key_mode: enclave}]\n", "level-1"},
		{"dotted id without layout", "enclaves:\n  - {id: 3.1, name: web}\n", "enclave 1"},
		{"bad pair", "layout: 8.8\npairs:\n  allow: [3.1-x]\n", "pairs: allow"},
		{"two kinds in one assertion", "assertions:\n  - never: {reader: a, pair: 1-2}\n    always: {reader: a, pair: 1-2}\n", "assertion 1"},
	} {
		if _, err := Parse([]byte(c.body)); !errors.Is(err, ErrFile) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want %q", c.name, err, c.want)
		}
	}
}

// FuzzParse: any bytes give a file or ErrFile, never a panic.
func FuzzParse(f *testing.F) {
	raw, _ := Marshal(mustFile(f))
	f.Add(raw)
	f.Add([]byte("layout: 6.5.5\nenclaves:\n  - {id: 5.3.1, name: x}\n"))
	f.Add([]byte("assertions:\n  - only: {pair: 1-2, readers: [a]}\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		if file, err := Parse(b); err != nil && !errors.Is(err, ErrFile) {
			t.Fatalf("%v", err)
		} else if err == nil {
			if _, err := Marshal(file); err != nil {
				t.Fatal(err)
			}
		}
	})
}

func mustFile(tb testing.TB) *File {
	f, err := FromStatus(everything())
	if err != nil {
		tb.Fatal(err)
	}
	return f
}
