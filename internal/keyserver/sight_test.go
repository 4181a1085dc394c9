package keyserver

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/enclavekeys/enclave/internal/api"
	"github.com/enclavekeys/enclave/internal/audit"
	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/registry"
	"github.com/enclavekeys/enclave/internal/store"
	"github.com/enclavekeys/enclave/internal/visibility"
)

func mapOf(st *api.StatusReply) *visibility.Map { return visibility.Build("example.org", st, nil) }

func diffJSON(t *testing.T, d *visibility.Diff) string {
	t.Helper()
	b, err := json.Marshal(d)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// replayLog replays the lab's audit log (verified as it is read).
func (l *lab) replayLog() *visibility.Replay {
	l.t.Helper()
	f, err := os.Open(l.audit)
	if err != nil {
		l.t.Fatal(err)
	}
	defer f.Close()
	r := visibility.NewReplay()
	if _, err := audit.Walk(f, r.Add); err != nil {
		l.t.Fatalf("audit log: %v", err)
	}
	return r
}

// sameReaders fails unless the replay's readers at a moment equal the
// map's, pair by pair (device and right; a server key's scope is the
// map's gloss and not recorded).
func sameReaders(t *testing.T, when string, m *visibility.Map, replayed map[string][]visibility.Reader) {
	t.Helper()
	strip := func(rs []visibility.Reader) []string {
		var out []string
		for _, r := range rs {
			out = append(out, r.Device+"="+r.Right)
		}
		return out
	}
	for _, p := range m.Pairs {
		if got, want := strip(replayed[p.Key()]), strip(p.Readers); !slices.Equal(got, want) {
			t.Errorf("%s: pair %s: the log's replay says %q, the map %q", when, p.Key(), got, want)
		}
		delete(replayed, p.Key())
	}
	for k, rs := range replayed {
		t.Errorf("%s: the replay has readers of pair %s that the map lacks: %q", when, k, strip(rs))
	}
}

// TestPreviewAndSight: for every kind of registry change, the dry run's
// visibility diff equals the diff of the maps before and after the same
// change applied, a dry run changes nothing, and the audit log's replay
// equals the live map after every step and at every earlier moment.
func TestPreviewAndSight(t *testing.T) {
	l := newLab(t)
	admin := l.client(idAdmin)
	ctx := context.Background()
	pair := func(a, b uint32) *api.Pair { return &api.Pair{A: a, B: b} }
	steps := []struct {
		name string
		req  *api.PreviewRequest
		// want is a line the diff must hold ("" for none).
		gains, loses string
	}{
		{"enclave add", &api.PreviewRequest{Change: &api.PreviewRequest_AddEnclave{AddEnclave: &api.AddEnclaveRequest{Id: 1, Name: "web"}}}, "", ""},
		{"enclave add", &api.PreviewRequest{Change: &api.PreviewRequest_AddEnclave{AddEnclave: &api.AddEnclaveRequest{Id: 2, Name: "app"}}}, "", ""},
		{"enclave add", &api.PreviewRequest{Change: &api.PreviewRequest_AddEnclave{AddEnclave: &api.AddEnclaveRequest{Id: 3, Name: "db"}}}, "", ""},
		{"org key server", &api.PreviewRequest{Change: &api.PreviewRequest_AddDevice{AddDevice: &api.AddDeviceRequest{Name: "ks-org", Role: "keyserver"}}}, "", ""},
		{"pair allow", &api.PreviewRequest{Change: &api.PreviewRequest_AllowPair{AllowPair: &api.AllowPairRequest{A: 1, B: 2}}}, "ks-org 1-2", ""},
		{"server", &api.PreviewRequest{Change: &api.PreviewRequest_AddDevice{AddDevice: &api.AddDeviceRequest{Name: "web1", Role: "server", Enclave: 1, ServerId: u32(10)}}}, "web1 1-2", ""},
		{"enclave key server", &api.PreviewRequest{Change: &api.PreviewRequest_AddDevice{AddDevice: &api.AddDeviceRequest{Name: "ks-app", Role: "keyserver", Enclave: 2}}}, "ks-app 1-2", ""},
		{"gateway", &api.PreviewRequest{Change: &api.PreviewRequest_AddDevice{AddDevice: &api.AddDeviceRequest{Name: "gw-x", Role: "gateway"}}}, "", ""},
		{"pair allow", &api.PreviewRequest{Change: &api.PreviewRequest_AllowPair{AllowPair: &api.AllowPairRequest{A: 2, B: 3}}}, "ks-app 2-3", ""},
		{"grant add", &api.PreviewRequest{Change: &api.PreviewRequest_AddGrant{AddGrant: &api.AddGrantRequest{Device: "gw-x", Pairs: []*api.Pair{pair(3, 2), pair(1, 2)}}}}, "gw-x 2-3", ""},
		{"monitor", &api.PreviewRequest{Change: &api.PreviewRequest_AddDevice{AddDevice: &api.AddDeviceRequest{Name: "soc", Role: "monitor"}}}, "", ""},
		{"grant all", &api.PreviewRequest{Change: &api.PreviewRequest_AddGrant{AddGrant: &api.AddGrantRequest{Device: "soc", All: true}}}, "soc 1-2", ""},
		{"pair allow 1-3", &api.PreviewRequest{Change: &api.PreviewRequest_AllowPair{AllowPair: &api.AllowPairRequest{A: 1, B: 3}}}, "soc 1-3", ""},
		{"grant remove", &api.PreviewRequest{Change: &api.PreviewRequest_RevokeGrant{RevokeGrant: &api.RevokeGrantRequest{Device: "gw-x", Pairs: []*api.Pair{pair(2, 3)}}}}, "", "gw-x 2-3"},
		{"rotate", &api.PreviewRequest{Change: &api.PreviewRequest_Rotate{Rotate: &api.RotateRequest{Pair: pair(1, 2), Now: true}}}, "", ""},
		{"device revoke", &api.PreviewRequest{Change: &api.PreviewRequest_RevokeDevice{RevokeDevice: &api.RevokeDeviceRequest{Name: "ks-app"}}}, "", "ks-app 2-3"},
		{"device remove", &api.PreviewRequest{Change: &api.PreviewRequest_RemoveDevice{RemoveDevice: &api.RemoveDeviceRequest{Name: "ks-app"}}}, "", ""},
		{"pair forbid", &api.PreviewRequest{Change: &api.PreviewRequest_ForbidPair{ForbidPair: &api.ForbidPairRequest{A: 1, B: 3}}}, "", "soc 1-3"},
		{"grant remove all", &api.PreviewRequest{Change: &api.PreviewRequest_RevokeGrant{RevokeGrant: &api.RevokeGrantRequest{Device: "soc"}}}, "", "soc 1-2"},
	}
	type moment struct {
		at time.Time
		m  *visibility.Map
	}
	var moments []moment
	has := func(as []visibility.Access, want string) bool {
		return slices.ContainsFunc(as, func(a visibility.Access) bool { return a.Device+" "+a.Pair == want })
	}
	for i, s := range steps {
		l.clock.Advance(time.Minute)
		st0, err := admin.Status(ctx, &api.StatusRequest{})
		if err != nil {
			t.Fatal(err)
		}
		pv, err := admin.Preview(ctx, s.req)
		if err != nil {
			t.Fatalf("step %d (%s): preview: %v", i, s.name, err)
		}
		if d := visibility.Compare(mapOf(st0), mapOf(pv.GetBefore())); !d.Empty() {
			t.Fatalf("step %d (%s): the preview's before is not the registry: %s", i, s.name, diffJSON(t, d))
		}
		again, err := admin.Status(ctx, &api.StatusRequest{})
		if err != nil {
			t.Fatal(err)
		}
		if d := visibility.Compare(mapOf(st0), mapOf(again)); !d.Empty() || len(again.GetPairs()) != len(st0.GetPairs()) {
			t.Fatalf("step %d (%s): a dry run changed the registry: %s", i, s.name, diffJSON(t, d))
		}
		if _, err := api.Apply(ctx, admin, s.req); err != nil {
			t.Fatalf("step %d (%s): %v", i, s.name, err)
		}
		st1, err := admin.Status(ctx, &api.StatusRequest{})
		if err != nil {
			t.Fatal(err)
		}
		dry := visibility.Compare(mapOf(pv.GetBefore()), mapOf(pv.GetAfter()))
		applied := visibility.Compare(mapOf(st0), mapOf(st1))
		if a, b := diffJSON(t, dry), diffJSON(t, applied); a != b {
			t.Fatalf("step %d (%s): the dry run's diff\n%s\ndiffers from the applied change's\n%s", i, s.name, a, b)
		}
		if s.gains != "" && !has(applied.Gained, s.gains) {
			t.Errorf("step %d (%s): %q does not gain sight: %s", i, s.name, s.gains, diffJSON(t, applied))
		}
		if s.loses != "" && !has(applied.Lost, s.loses) {
			t.Errorf("step %d (%s): %q does not lose sight: %s", i, s.name, s.loses, diffJSON(t, applied))
		}
		if s.name == "rotate" && len(applied.Rotated) != 1 {
			t.Errorf("rotate --now: rotated pairs %v", applied.Rotated)
		}
		m := mapOf(st1)
		sameReaders(t, "after step "+s.name, m, l.replayLog().At(l.clock.Now()))
		moments = append(moments, moment{l.clock.Now(), m})
	}
	// Every earlier moment: the replay up to it equals the map then.
	r := l.replayLog()
	if r.Unrecorded != 0 {
		t.Errorf("%d changes recorded without their sight", r.Unrecorded)
	}
	for i, mo := range moments {
		sameReaders(t, "at step "+steps[i].name, mo.m, r.At(mo.at))
	}
	l.verifyAudit()
}

// TestPreviewRefused: a dry run of a change the registry refuses is refused
// with the change's own code, and only admins may preview.
func TestPreviewRefused(t *testing.T) {
	l := newLab(t)
	admin := setup(t, l)
	ctx := context.Background()
	for _, c := range []struct {
		req  *api.PreviewRequest
		code codes.Code
	}{
		{&api.PreviewRequest{Change: &api.PreviewRequest_AddEnclave{AddEnclave: &api.AddEnclaveRequest{Id: 3, Name: "again"}}}, codes.AlreadyExists},
		{&api.PreviewRequest{Change: &api.PreviewRequest_RevokeDevice{RevokeDevice: &api.RevokeDeviceRequest{Name: "nobody"}}}, codes.NotFound},
		{&api.PreviewRequest{Change: &api.PreviewRequest_AllowPair{AllowPair: &api.AllowPairRequest{A: 0, B: 3}}}, codes.InvalidArgument},
		{&api.PreviewRequest{}, codes.InvalidArgument},
	} {
		if _, err := admin.Preview(ctx, c.req); status.Code(err) != c.code {
			t.Errorf("preview %v: %v, want %v", c.req, err, c.code)
		}
	}
	gw := l.client(idGateway)
	if _, err := gw.Preview(ctx, &api.PreviewRequest{Change: &api.PreviewRequest_AddGrant{AddGrant: &api.AddGrantRequest{Device: "gw", All: true}}}); status.Code(err) != codes.PermissionDenied {
		t.Errorf("a gateway previews a change: %v", err)
	}
}

// TestSameSight: changes to what the map is not built from (a token, an
// endpoint, a generation) need no maps built; a change to a device, a
// pair or a grant does.
func TestSameSight(t *testing.T) {
	base := &registry.State{}
	if err := base.AddEnclave(3, "web"); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name   string
		change func(st *registry.State) error
		same   bool
	}{
		{"token", func(st *registry.State) error {
			return st.AddToken(registry.JoinToken{Hash: strings.Repeat("ab", 32), Device: registry.Device{Name: "x", Role: ca.RoleClient}, Expires: t0.Add(time.Hour)}, t0)
		}, true},
		{"spi lease", func(st *registry.State) error {
			st.SPILeases.Put(registry.SPILease{})
			return nil
		}, true},
		{"device", func(st *registry.State) error { return st.AddDevice(registry.Device{Name: "gw", Role: ca.RoleGateway}) }, false},
		{"enclave", func(st *registry.State) error { return st.AddEnclave(7, "db") }, false},
		{"pair", func(st *registry.State) error { return st.AllowPair(3, 3, t0) }, false},
	} {
		after, err := base.Clone()
		if err != nil {
			t.Fatal(err)
		}
		if err := c.change(after); err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		if got := snapshotSight(base).samePolicy(after) && len(changedDevices(after)) == 0; got != c.same {
			t.Errorf("%s: same %v, want %v", c.name, got, c.same)
		}
	}
}

// labFiles is a lab's directory, clock and CA, and a function that opens
// (again) its store and audit log there: for tests that stop and start a
// key service on the same files, or put a store of their own in front.
func labFiles(t *testing.T) (string, *fakeClock, *ca.Authority, func() (store.Store, *audit.Log)) {
	dir := t.TempDir()
	clock := &fakeClock{now: t0}
	auth, err := ca.Init(filepath.Join(dir, "ca"), "example.org", t0)
	if err != nil {
		t.Fatal(err)
	}
	return dir, clock, auth, func() (store.Store, *audit.Log) {
		st, err := store.OpenBolt(filepath.Join(dir, "enclave.db"), testKEK(t))
		if err != nil {
			t.Fatal(err)
		}
		al, err := audit.Open(filepath.Join(dir, "audit.log"), clock.Now, st)
		if err != nil {
			t.Fatal(err)
		}
		return st, al
	}
}

// frozenStore is a store whose next Update runs the change (its audit
// entries are written) and then never commits: the key service is killed
// between the two. freeze arms it; frozen says the change ran.
type frozenStore struct {
	store.Store
	armed   atomic.Bool
	frozen  chan struct{}
	release chan struct{}
}

func (f *frozenStore) Update(ctx context.Context, fn func(*registry.State) error) (*registry.State, error) {
	if !f.armed.CompareAndSwap(true, false) {
		return f.Store.Update(ctx, fn)
	}
	st, err := f.Store.View(ctx)
	if err != nil {
		return nil, err
	}
	c, err := st.Clone()
	if err != nil {
		return nil, err
	}
	if err := fn(c); err != nil {
		return nil, err
	}
	close(f.frozen)
	<-f.release
	return nil, errors.New("killed")
}

// TestSightSurvivesLostCommit: a change whose audit entries were written
// but whose commit a kill -9 lost is left out of the replay once the key
// service starts again (its start names the last change committed), so
// the log's answer still equals the live map.
func TestSightSurvivesLostCommit(t *testing.T) {
	dir, clock, auth, open := labFiles(t)
	st, al := open()
	fs := &frozenStore{Store: st, frozen: make(chan struct{}), release: make(chan struct{})}
	l := startLab(t, auth, clock, fs, al, nil)
	l.audit = filepath.Join(dir, "audit.log")
	admin := setup(t, l) // gw granted 3-7, ids everything
	ctx := context.Background()

	fs.armed.Store(true)
	lost := make(chan error, 1)
	go func() {
		_, err := admin.AllowPair(ctx, &api.AllowPairRequest{A: 3, B: 9})
		lost <- err
	}()
	select {
	case <-fs.frozen:
	case err := <-lost:
		t.Fatalf("the change never reached its commit: %v", err)
	}
	al.Close() // the process dies: nothing more reaches its log
	close(fs.release)
	if err := <-lost; err == nil {
		t.Fatal("the lost change was answered as made")
	}
	l.stop()
	if log := readFile(t, l.audit); !strings.Contains(log, `"rpc":"sight","ids":{"device":"ids","pairs":["3-9"]}`) {
		t.Fatalf("the lost change's sight is not in the log, so this test shows nothing:\n%s", log)
	}

	st2, al2 := open()
	l2 := startLab(t, auth, clock, st2, al2, nil)
	l2.audit = l.audit
	status, err := l2.client(idAdmin).Status(ctx, &api.StatusRequest{})
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for !strings.Contains(readFile(t, l2.audit), `"rpc":"start"`) && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond) // Run writes it as it starts
	}
	sameReaders(t, "after the restart", mapOf(status), l2.replayLog().At(clock.Now()))
	// The next change follows the last one committed, not the lost one,
	// and the replay still equals the map.
	admin2 := l2.client(idAdmin)
	if _, err := admin2.AllowPair(ctx, &api.AllowPairRequest{A: 7, B: 9}); err != nil {
		t.Fatal(err)
	}
	status, err = admin2.Status(ctx, &api.StatusRequest{})
	if err != nil {
		t.Fatal(err)
	}
	sameReaders(t, "after the next change", mapOf(status), l2.replayLog().At(clock.Now()))
	l2.verifyAudit()
}

// erringStore commits its next Update and then answers it with an error,
// as an etcd transaction that timed out after it applied.
type erringStore struct {
	store.Store
	armed atomic.Bool
}

func (e *erringStore) Update(ctx context.Context, fn func(*registry.State) error) (*registry.State, error) {
	st, err := e.Store.Update(ctx, fn)
	if err == nil && e.armed.CompareAndSwap(true, false) {
		return nil, context.DeadlineExceeded
	}
	return st, err
}

// TestCommitThenError (issue 31): a change the store applied but answered
// with an error is answered as made, is not voided, and the replay of the
// log names its readers as the live map does (it used to drop them for
// ever).
func TestCommitThenError(t *testing.T) {
	dir, clock, auth, open := labFiles(t)
	st, al := open()
	es := &erringStore{Store: st}
	l := startLab(t, auth, clock, es, al, nil)
	l.audit = filepath.Join(dir, "audit.log")
	admin := setup(t, l)
	ctx := context.Background()
	es.armed.Store(true)
	if _, err := admin.AllowPair(ctx, &api.AllowPairRequest{A: 3, B: 9}); err != nil { // ids reads it: a reader gained
		t.Fatalf("a committed change answered as failed: %v", err)
	}
	if log := readFile(t, l.audit); strings.Contains(log, `"voids"`) {
		t.Fatalf("a committed change was voided:\n%s", log)
	}
	status, err := admin.Status(ctx, &api.StatusRequest{})
	if err != nil {
		t.Fatal(err)
	}
	sameReaders(t, "after a commit answered with an error", mapOf(status), l.replayLog().At(clock.Now()))
	l.verifyAudit()
}
