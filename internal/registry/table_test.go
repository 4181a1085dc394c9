package registry

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"reflect"
	"slices"
	"testing"
	"time"

	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/keys"
)

// TestTableForks: a fork and its original change apart (property test:
// random puts and deletes on both, each checked against a plain map);
// Changed lists exactly the keys a fork touched.
func TestTableForks(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	var a Table[string, Device]
	model := map[string]Device{}
	for i := range 500 {
		d := Device{Name: fmt.Sprintf("d%03d", i), Role: ca.RoleClient}
		a.Put(d)
		model[d.Name] = d
	}
	for round := range 20 {
		b := a.fork()
		bm := maps(model)
		touched := map[string]bool{}
		for range 200 {
			name := fmt.Sprintf("d%03d", rng.IntN(700))
			if rng.IntN(3) == 0 {
				b.Delete(name)
				if _, ok := bm[name]; ok {
					touched[name] = true
				}
				delete(bm, name)
			} else {
				d := Device{Name: name, Role: ca.RoleServer, Overlay: fmt.Sprint(round)}
				b.Put(d)
				bm[name] = d
				touched[name] = true
			}
		}
		if !equalModel(&a, model) {
			t.Fatalf("round %d: the original changed with its fork", round)
		}
		if !equalModel(&b, bm) {
			t.Fatalf("round %d: the fork lost a change", round)
		}
		got := slices.Sorted(b.Changed())
		var want []string
		for k := range touched {
			want = append(want, k)
		}
		slices.Sort(want)
		if !slices.Equal(got, want) {
			t.Fatalf("round %d: changed %d keys, want %d", round, len(got), len(want))
		}
		a, model = b, bm
	}
	raw, err := json.Marshal(a)
	if err != nil {
		t.Fatal(err)
	}
	var back Table[string, Device]
	if err := json.Unmarshal(raw, &back); err != nil || !equalModel(&back, model) {
		t.Fatalf("JSON round trip: %v", err)
	}
}

func maps(m map[string]Device) map[string]Device {
	out := make(map[string]Device, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}

func equalModel(t *Table[string, Device], m map[string]Device) bool {
	if t.Len() != len(m) {
		return false
	}
	prev := ""
	for d := range t.All() {
		if d.Name <= prev && prev != "" || !reflect.DeepEqual(m[d.Name], d) {
			return false
		}
		prev = d.Name
	}
	return true
}

// TestForkIndexes: after random registrations, tokens, revocations and
// withdrawals on chains of forks, each registry's indexes are the ones
// built from scratch, its original's untouched; duplicate server ids and
// addresses are refused as before.
func TestForkIndexes(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	t0 := time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)
	s := &State{}
	s.AddEnclave(3, "web")
	s.AddEnclave(7, "clients")
	if err := s.SetAddresses(7, netip.MustParsePrefix("100.64.7.0/24"), netip.MustParsePrefix("100.64.0.0/10")); err != nil {
		t.Fatal(err)
	}
	s = s.Fork()
	for round := range 30 {
		before, err := s.Clone()
		if err != nil {
			t.Fatal(err)
		}
		f := s.Fork()
		for range 10 {
			n := rng.IntN(60)
			name := fmt.Sprintf("h%02d", n)
			switch rng.IntN(5) {
			case 0:
				k := keys.ServerID(rng.IntN(20) + 1)
				f.AddDevice(Device{Name: name, Role: ca.RoleServer, Enclave: 3, ServerID: &k})
			case 1:
				f.AddDevice(Device{Name: name, Role: ca.RoleClient, Enclave: 7})
			case 2:
				f.AddToken(JoinToken{Hash: fmt.Sprintf("%02d%02d", n, round), Device: Device{Name: name, Role: ca.RoleClient, Enclave: 7}, Expires: t0.Add(time.Duration(rng.IntN(5)+1) * time.Hour)}, t0.Add(time.Duration(round)*10*time.Minute))
			case 3:
				f.RevokeDevice(name, t0)
			case 4:
				f.WithdrawToken(name)
			}
		}
		if !sameIndexes(f.ix(), (&State{Devices: TableOf(f.Devices.Slice()...), Tokens: TableOf(f.Tokens.Slice()...), Endpoints: f.Endpoints}).ix()) {
			t.Fatalf("round %d: the fork's indexes differ from ones built afresh", round)
		}
		same, _ := s.Clone()
		if a, b := mustJSON(t, before), mustJSON(t, same); a != b {
			t.Fatalf("round %d: the original changed with its fork", round)
		}
		if !f.ForkedFrom(s) || s.ForkedFrom(f) {
			t.Fatal("ForkedFrom")
		}
		s = f
	}
	// Every address held is one device's or token's.
	seen := map[netip.Addr]string{}
	for d := range s.Devices.All() {
		if p, err := netip.ParsePrefix(d.Overlay); err == nil {
			if o, dup := seen[p.Addr()]; dup {
				t.Fatalf("%s and %s hold %s", o, d.Name, p.Addr())
			}
			seen[p.Addr()] = d.Name
		}
	}
}

// sameIndexes compares the entries of two registries' indexes (not the
// free-address hints, which only a claim sets).
func sameIndexes(a, b *indexes) bool {
	return reflect.DeepEqual(a.servers.Slice(), b.servers.Slice()) && reflect.DeepEqual(a.addrs.Slice(), b.addrs.Slice()) &&
		reflect.DeepEqual(a.tokens.Slice(), b.tokens.Slice()) && reflect.DeepEqual(a.expiry.Slice(), b.expiry.Slice()) &&
		reflect.DeepEqual(a.endpoints.Slice(), b.endpoints.Slice()) && reflect.DeepEqual(a.revoked.Slice(), b.revoked.Slice())
}

func mustJSON(t *testing.T, v any) string {
	raw, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return string(raw)
}
