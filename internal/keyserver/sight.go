package keyserver

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"iter"
	"slices"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/enclavekeys/enclave/internal/api"
	"github.com/enclavekeys/enclave/internal/audit"
	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/registry"
	"github.com/enclavekeys/enclave/internal/visibility"
)

// What a registry change does to who can read what (DESIGN §8): a change
// is audited with the sight it gives and takes (one entry per device and
// right, naming the pairs), so that the log alone answers who could read
// a pair at any moment (enclave audit readers); and Preview answers the
// same before a change is made (a dry run), from the same model.

// Preview implements api.AdminServer: the change runs on a copy of the
// current registry; nothing is committed and no watcher hears of it. It
// is refused as the change itself would be (the caller must be an admin
// of a tier that takes changes; a change the registry refuses is refused
// with the same code and message).
func (s *Service) Preview(ctx context.Context, req *api.PreviewRequest) (*api.PreviewReply, error) {
	const rpc = "Preview"
	c, err := s.authorize(ctx, rpc, ca.RoleAdmin)
	if err != nil {
		return nil, err
	}
	if err := s.takesChanges(c, rpc); err != nil {
		return nil, err
	}
	var ch change
	switch x := req.GetChange().(type) {
	case *api.PreviewRequest_AddEnclave:
		ch = s.addEnclave(x.AddEnclave)
	case *api.PreviewRequest_AddDevice:
		ch = s.addDevice(x.AddDevice)
	case *api.PreviewRequest_RevokeDevice:
		ch = s.revokeDevice(x.RevokeDevice)
	case *api.PreviewRequest_RemoveDevice:
		ch = s.removeDevice(x.RemoveDevice)
	case *api.PreviewRequest_AllowPair:
		ch = s.allowPair(x.AllowPair)
	case *api.PreviewRequest_ForbidPair:
		ch = s.forbidPair(x.ForbidPair)
	case *api.PreviewRequest_AddGrant:
		ch = s.addGrant(x.AddGrant)
	case *api.PreviewRequest_RevokeGrant:
		ch = s.revokeGrant(x.RevokeGrant)
	case *api.PreviewRequest_Rotate:
		ch = s.rotate(x.Rotate)
	case *api.PreviewRequest_AddAssertion:
		ch = s.addAssertion(x.AddAssertion)
	case *api.PreviewRequest_RemoveAssertion:
		ch = s.removeAssertion(x.RemoveAssertion)
	case *api.PreviewRequest_SetEnclaveKeyMode:
		ch = s.setEnclaveKeyMode(x.SetEnclaveKeyMode)
	default:
		s.deny(c, rpc, "", nil, "no change to preview")
		return nil, status.Error(codes.InvalidArgument, "preview: no change given")
	}
	before, after, rotations, msg, broken, err := s.tryOnCopy(ctx, c, rpc, ch)
	if err != nil {
		return nil, err
	}
	reply := &api.PreviewReply{Rpc: ch.rpc, Message: msg, Before: statusOf(before), After: statusOf(after), Broken: broken}
	for _, r := range rotations {
		reply.Rotations = append(reply.Rotations, apiOutcome(r))
	}
	return reply, nil
}

// tryOnCopy runs a change on a copy of the registry and commits nothing
// (a dry run): the registry before and after, what the change would
// rotate and answer, and the sight assertions it would break (commit
// would refuse it then; a dry run shows them all). The attempt is
// audited as c's rpc.
func (s *Service) tryOnCopy(ctx context.Context, c *caller, rpc string, ch change) (before, after *registry.State, rot []registry.RotationEvent, msg string, broken []string, err error) {
	if before, err = s.store.View(ctx); err != nil {
		return nil, nil, nil, "", nil, status.Error(codes.Unavailable, err.Error())
	}
	if after, err = before.Clone(); err != nil {
		return nil, nil, nil, "", nil, status.Error(codes.Internal, err.Error())
	}
	if rot, msg, err = ch.fn(after); err != nil {
		s.deny(c, rpc, "", ch.ids, "dry run of "+ch.rpc+": "+err.Error())
		return nil, nil, nil, "", nil, status.Error(adminCode(err), err.Error())
	}
	broken = freshBreaks(brokenAssertions(before, nil), after)
	outcome := "dry run of " + ch.rpc + " (nothing committed)"
	if len(broken) > 0 {
		outcome = fmt.Sprintf("dry run of %s (nothing committed): it would be refused, breaking %d sight assertions", ch.rpc, len(broken))
	}
	if err := s.allow(c, rpc, []audit.Entry{{IDs: ch.ids}}, outcome); err != nil {
		return nil, nil, nil, "", nil, err
	}
	return before, after, rot, msg, broken, nil
}

// sightSnapshot is what commit keeps of the registry before a change: the
// parts of the map's inputs that are not devices (enclaves, pair rules,
// grants), to tell whether the change touched them, and the registry
// itself (a fork: O(1)), to draw the map before from when it did. Which
// devices the change touched, the registry's tables know (Changed): a
// change to a few devices costs a map of those devices, not of the fleet.
type sightSnapshot struct {
	policy []byte
	before *registry.State
	full   *api.StatusReply // statusOf(before), made when asked for
}

func snapshotSight(st *registry.State) *sightSnapshot {
	return &sightSnapshot{policy: sightPolicy(st), before: st.Fork()}
}

// sightPolicy is what the visibility map is built from besides devices
// (nil if it does not encode, which counts as a change).
func sightPolicy(st *registry.State) []byte {
	raw, err := json.Marshal([]any{st.Enclaves, st.Allowed, st.Forbidden, st.Grants})
	if err != nil {
		return nil
	}
	return raw
}

// changedDevices are the devices after's change touched (its table's
// changes: after is a fork made for the change, or a registry decoded
// for it).
func changedDevices(after *registry.State) []string {
	return slices.Sorted(after.Devices.Changed())
}

// samePolicy reports whether after agrees with the snapshot on every input
// of the map but devices.
func (b *sightSnapshot) samePolicy(after *registry.State) bool {
	return b.policy != nil && bytes.Equal(b.policy, sightPolicy(after))
}

// status is the whole registry before, as the Status RPC shows it.
func (b *sightSnapshot) status() *api.StatusReply {
	if b.full == nil {
		b.full = statusOf(b.before)
	}
	return b.full
}

// entries are the audit entries for what changing the registry from the
// snapshot to after does to who can read which pair: one per device,
// right and kind of change, its pairs in IDs.Pairs (split to fit an
// entry).
func (b *sightSnapshot) entries(after *registry.State) []audit.Entry {
	var d *visibility.Diff
	switch names := changedDevices(after); {
	case !b.samePolicy(after):
		d = visibility.CompareStatus(b.status(), statusOf(after))
	case len(names) == 0:
		return nil
	default: // only these devices' sight can have changed
		d = visibility.CompareStatus(statusOfDevices(b.before, names), statusOfDevices(after, names))
	}
	var out []audit.Entry
	for _, g := range d.Groups() {
		for len(g.Pairs) > 0 {
			n := min(len(g.Pairs), MaxPairsPerRequest)
			out = append(out, audit.Entry{Caller: "keyserver", Role: string(ca.RoleKeyserver), RPC: "sight",
				IDs:      &audit.IDs{Device: g.Device, Pairs: g.Pairs[:n]},
				Sight:    &audit.Sight{Change: g.Change, Device: g.Device, Role: g.Role, Right: g.Right, From: g.From},
				Decision: audit.Allow, Reason: sightReason(g, n)})
			g.Pairs = g.Pairs[n:]
		}
	}
	return out
}

// auditStart writes, when a key service starts on a registry that changes
// were committed to, which change was committed last: the entries of an
// attempt that a crash cut off from its commit are then known void, even
// if no change follows (visibility.Replay).
func (s *Service) auditStart(ctx context.Context) error {
	st, err := s.store.View(ctx)
	if err != nil || st.LastChange == "" {
		return err
	}
	e := audit.Entry{Caller: "keyserver", Role: string(ca.RoleKeyserver), RPC: "start", Decision: audit.Allow, Follows: st.LastChange,
		Reason: "key service started; the last change committed is " + st.LastChange}
	if err := s.audit.Append(e); err != nil {
		s.log.Error("audit write failed", "rpc", "start", "err", err)
		return err
	}
	return nil
}

// auditStop writes, as the key service stops cleanly, which change was
// committed last: a store later found behind that (restored from an
// older backup) is then told from one whose last commit a crash lost
// (Reconcile).
func (s *Service) auditStop() {
	st, err := s.store.View(context.Background())
	if err != nil || st.LastChange == "" {
		return
	}
	e := audit.Entry{Caller: "keyserver", Role: string(ca.RoleKeyserver), RPC: "stop", Decision: audit.Allow, Follows: st.LastChange,
		Reason: "key service stopped; the last change committed is " + st.LastChange}
	if err := s.audit.Append(e); err != nil {
		s.log.Error("audit write failed", "rpc", "stop", "err", err)
	}
}

func sightReason(g visibility.Group, n int) string {
	if g.Change == visibility.Changes {
		return g.Device + " reads these pairs by " + g.Right + " instead of " + g.From
	}
	return g.Device + " " + g.Change + " sight of these pairs: " + g.Right
}

// changeName names one attempt of a change in the audit log.
func changeName() string {
	var b [8]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// statusOf is the registry as the Status RPC shows it.
func statusOf(st *registry.State) *api.StatusReply { return statusWith(st, st.Devices.All()) }

// statusOfDevices is statusOf with only the named devices (those
// registered).
func statusOfDevices(st *registry.State, names []string) *api.StatusReply {
	return statusWith(st, func(yield func(registry.Device) bool) {
		for _, n := range names {
			if d, ok := st.Device(n); ok && !yield(d) {
				return
			}
		}
	})
}

// statusWith is statusOf with the devices devs.
func statusWith(st *registry.State, devs iter.Seq[registry.Device]) *api.StatusReply {
	out := &api.StatusReply{}
	for _, e := range st.Enclaves {
		out.Enclaves = append(out.Enclaves, &api.Enclave{Id: uint32(e.ID), Name: e.Name, Addresses: e.Addresses, Network: e.Network, EnclaveKey: e.EnclaveKey})
	}
	for d := range devs {
		ad := &api.Device{Name: d.Name, Role: string(d.Role), Enclave: uint32(d.Enclave), Revoked: d.Revoked, Fingerprint: d.Fingerprint, Removed: d.Removed, Pending: d.Pending, Awaiting: d.Awaiting(), Overlay: d.Overlay}
		if d.RevokedAt != nil {
			ad.RevokedAt = timestamppb.New(*d.RevokedAt)
		}
		if d.ServerID != nil {
			k := uint32(*d.ServerID)
			ad.ServerId = &k
		}
		if e, ok := st.EndpointOf(d.Name); ok {
			for _, ap := range e.Data {
				ad.Endpoints = append(ad.Endpoints, ap.String())
			}
			if c, err := x509.ParseCertificate(e.Cert); err == nil {
				ad.CertExpires = timestamppb.New(c.NotAfter)
			}
		}
		out.Devices = append(out.Devices, ad)
	}
	out.Layout = st.EnclaveLayout
	for _, a := range st.Assertions {
		out.Assertions = append(out.Assertions, apiAssertion(a))
	}
	for _, p := range st.Forbidden {
		out.Forbidden = append(out.Forbidden, apiPair(p))
	}
	for _, p := range st.Allowed { // with its level-1 pair's generation
		g, ok := st.Generation(p)
		if !ok {
			continue
		}
		ps := &api.PairStatus{Pair: apiPair(p), Generation: uint32(g.Current), RotatedAt: timestamppb.New(g.RotatedAt)}
		if !g.PendingAt.IsZero() {
			ps.PendingAt = timestamppb.New(g.PendingAt)
		}
		out.Pairs = append(out.Pairs, ps)
	}
	for _, g := range st.Grants {
		ag := &api.Grant{Device: g.Device, All: g.All}
		for _, p := range g.Pairs {
			ag.Pairs = append(ag.Pairs, apiPair(p))
		}
		out.Grants = append(out.Grants, ag)
	}
	return out
}
