package keyserver

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/enclavekeys/enclave/internal/api"
	"github.com/enclavekeys/enclave/internal/audit"
	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/orgfile"
	"github.com/enclavekeys/enclave/internal/registry"
)

// Applying an organisation file (issue 34): the registry is made what the
// file says in one store update, audited as one change (ApplyOrg), or
// nothing changes. Each step is the admin change of its own command
// (enclave add, device add, device revoke, grant add and revoke, pair
// rules, assertions), so that it checks, rotates and audits sight as that
// command does; the sight assertions the result keeps are held as for any
// change. A device the file adds without a pinned certificate, of a role
// that joins, is registered awaiting its host with a join token given
// once in the reply (the registry keeps its hash only), so its grant and
// the assertions count it from the start. A device left out of the file is
// revoked, one awaiting its host too. What the file cannot change is
// refused with the reason:
// enclaves are never removed nor renamed, a device's identity (role,
// enclave, server id, address) is not changed in place, a revoked device
// is never reinstated, a registered device is revoked only by being
// listed revoked (one left out is refused), and the layout is set only on
// an empty registry. A device's fingerprint pins the certificate of one
// the file adds; the registry's pin then moves with its renewals.

// MaxOrgFileBytes bounds an organisation file's size. What an apply
// costs grows faster than the file (each device added checks the
// registry's addresses and tokens; issue 36): thousands of devices added
// in one apply take seconds, during which other changes wait.
const MaxOrgFileBytes = 32 << 20

// ApplyOrg implements api.AdminServer: the file comes in pieces, each
// within the limit on a message, and only from an admin (the caller is
// checked before the first piece is read).
func (s *Service) ApplyOrg(stream grpc.ClientStreamingServer[api.ApplyOrgRequest, api.ApplyOrgReply]) error {
	const rpc = "ApplyOrg"
	ctx := stream.Context()
	c, err := s.authorize(ctx, rpc, ca.RoleAdmin)
	if err != nil {
		return err
	}
	if err := s.takesChanges(c, rpc); err != nil {
		return err
	}
	var req *api.ApplyOrgRequest
	var file []byte
	for {
		piece, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return err
		}
		if req == nil {
			req = piece
		}
		if len(file)+len(piece.GetFile()) > MaxOrgFileBytes {
			return s.refuse(c, rpc, codes.ResourceExhausted, fmt.Sprintf("an organisation file is at most %d MiB", MaxOrgFileBytes>>20))
		}
		file = append(file, piece.GetFile()...)
	}
	if req == nil {
		return s.refuse(c, rpc, codes.InvalidArgument, "no organisation file sent")
	}
	r, err := s.applyOrg(ctx, c, &api.ApplyOrgRequest{File: file, DryRun: req.GetDryRun(), TokenTtlSeconds: req.GetTokenTtlSeconds()})
	if err != nil {
		return err
	}
	return stream.SendAndClose(r)
}

// applyOrg applies (or, dry, plans) the whole file req carries for c.
func (s *Service) applyOrg(ctx context.Context, c *caller, req *api.ApplyOrgRequest) (*api.ApplyOrgReply, error) {
	const rpc = "ApplyOrg"
	f, err := orgfile.Parse(req.GetFile())
	if err != nil {
		return nil, s.refuse(c, rpc, codes.InvalidArgument, err.Error())
	}
	ttl := time.Duration(req.GetTokenTtlSeconds()) * time.Second
	if ttl == 0 {
		ttl = DefaultTokenTTL
	}
	if ttl < time.Minute || ttl > MaxTokenTTL {
		return nil, s.refuse(c, rpc, codes.InvalidArgument, fmt.Sprintf("a token lives 1 minute to %s, not %s", MaxTokenTTL, ttl))
	}
	var plan []string
	var tokens []*api.ApplyOrgToken
	ch := change{rpc, &audit.IDs{}, func(st *registry.State) ([]registry.RotationEvent, string, error) {
		plan, tokens = plan[:0], tokens[:0] // a store may run the change again
		rot, err := s.applyFile(st, f, ttl, &plan, &tokens)
		if err != nil {
			return nil, "", err
		}
		msg := fmt.Sprintf("organisation applied: %d changes", len(plan))
		if len(plan) == 0 {
			msg = "organisation applied: nothing to change"
		}
		return rot, msg, nil
	}}
	if req.GetDryRun() {
		before, after, rot, msg, broken, err := s.tryOnCopy(ctx, c, rpc, ch)
		if err != nil {
			return nil, err
		}
		// The tokens made on the copy are dropped with it: none is given.
		msg = strings.Replace(msg, "organisation applied", "the organisation would be applied", 1)
		out := &api.ApplyOrgReply{Plan: plan, Message: msg, Before: statusOf(before), After: statusOf(after), Broken: broken}
		for _, r := range rot {
			out.Rotations = append(out.Rotations, apiOutcome(r))
		}
		return out, nil
	}
	r, err := s.apply(ctx, ch)
	if err != nil {
		return nil, err
	}
	// A store that ran the change again and committed an earlier run
	// (etcd, after an error it reported) made other tokens: only those
	// the registry holds work, so only those are given.
	if st, err := s.store.View(ctx); err == nil {
		tokens = slices.DeleteFunc(tokens, func(t *api.ApplyOrgToken) bool {
			_, ok := st.Token(tokenHash(t.GetToken()))
			return !ok
		})
	}
	return &api.ApplyOrgReply{Plan: plan, Message: r.GetMessage(), Rotations: r.GetRotations(), Tokens: tokens}, nil
}

// applyFile makes st what f says, step by step, noting each step in plan
// and the join tokens of the devices it adds (living ttl) in tokens.
func (s *Service) applyFile(st *registry.State, f *orgfile.File, ttl time.Duration, plan *[]string, tokens *[]*api.ApplyOrgToken) ([]registry.RotationEvent, error) {
	var rot []registry.RotationEvent
	step := func(ch change, line string) error {
		r, _, err := ch.fn(st)
		if err != nil {
			return fmt.Errorf("%s: %w", strings.TrimLeft(line, "+-~ "), err)
		}
		rot = append(rot, r...)
		*plan = append(*plan, line)
		return nil
	}
	// The layout: the file's, set only on an empty registry.
	l := keys.Layout{}
	if f.Layout != "" {
		l, _ = keys.ParseLayout(f.Layout) // Parse checked it
	}
	if l != st.Layout() {
		if err := st.SetLayout(l); err != nil {
			return nil, err
		}
		*plan = append(*plan, "~ enclave layout "+l.String())
	}
	id := func(s string) keys.EnclaveID { v, _ := l.ParseID(s); return v } // Parse checked them
	pair := func(s string) registry.Pair { p, _ := registry.ParsePairIn(l, s); return p }

	// Enclaves: added, parents first (the file lists them in id order, as
	// export writes them; sorted again here whatever the file's order).
	want := map[keys.EnclaveID]orgfile.Enclave{}
	var ids []keys.EnclaveID
	for _, e := range f.Enclaves {
		want[id(e.ID)] = e
		ids = append(ids, id(e.ID))
	}
	slices.Sort(ids)
	for _, e := range st.Enclaves {
		if _, ok := want[e.ID]; !ok {
			return nil, fmt.Errorf("%w: enclave %s (%s) is not in the file: enclaves are never removed", registry.ErrInvalid, st.ID(e.ID), e.Name)
		}
	}
	for _, i := range ids {
		e := want[i]
		cur, ok := st.Enclave(i)
		switch {
		case !ok:
			if err := step(s.addEnclave(&api.AddEnclaveRequest{Id: uint32(i), Name: e.Name, Addresses: e.Addresses, Network: e.Network}), fmt.Sprintf("+ enclave %s (%s)", e.ID, e.Name)); err != nil {
				return nil, err
			}
		case cur.Name != e.Name || cur.Addresses != e.Addresses || cur.Network != e.Network:
			return nil, fmt.Errorf("%w: enclave %s is %q (addresses %q in %q) in the registry and %q (%q in %q) in the file: an enclave is not renamed, and its addresses change with enclave admin enclave addresses", registry.ErrInvalid, e.ID, cur.Name, cur.Addresses, cur.Network, e.Name, e.Addresses, e.Network)
		}
		if on := e.KeyMode == orgfile.KeyModeEnclave; on != (ok && cur.EnclaveKey) {
			line := "~ enclave " + e.ID + ": enclave-key mode"
			if !on {
				line = "~ enclave " + e.ID + ": keys from the org key"
			}
			if err := step(s.setEnclaveKeyMode(&api.SetEnclaveKeyModeRequest{Enclave: uint32(i), EnclaveKey: on}), line); err != nil {
				return nil, err
			}
		}
	}

	// Assertions the file drops go first; those it adds last, once the
	// registry is what it says (each change's result is held to them).
	wantAsserts, err := assertionsOf(f, pair)
	if err != nil {
		return nil, err
	}
	for _, a := range slices.Clone(st.Assertions) {
		if !slices.ContainsFunc(wantAsserts, a.Equal) {
			if err := st.RemoveAssertion(a); err != nil {
				return nil, err
			}
			*plan = append(*plan, "- assertion "+st.Describe(a))
		}
	}

	// Devices: added; revoked where the file says so or leaves them out.
	inFile := map[string]orgfile.Device{}
	for _, d := range f.Devices {
		inFile[d.Name] = d
		cur, ok := st.Device(d.Name)
		if !ok && d.Fingerprint == "" && registry.Joins(ca.Role(d.Role)) && !d.Revoked {
			t, err := s.awaitJoin(st, d, id, ttl)
			if err != nil {
				return nil, fmt.Errorf("device %s: %w", d.Name, err)
			}
			*tokens = append(*tokens, t)
			*plan = append(*plan, fmt.Sprintf("+ device %s (%s): a join token for its host, until %s", d.Name, d.Role, t.GetExpires().AsTime().UTC().Format(time.RFC3339)))
			cur, _ = st.Device(d.Name)
		} else if !ok {
			req := &api.AddDeviceRequest{Name: d.Name, Role: d.Role, Overlay: d.Address, Fingerprint: d.Fingerprint, ServerId: d.ServerID}
			if d.Enclave != "" {
				req.Enclave = uint32(id(d.Enclave))
			}
			if err := step(s.addDevice(req), fmt.Sprintf("+ device %s (%s)", d.Name, d.Role)); err != nil {
				return nil, err
			}
			cur, _ = st.Device(d.Name)
		} else if why := deviceDiffers(st, &cur, d, id); why != "" {
			return nil, fmt.Errorf("%w: device %s: %s in the registry, not as the file says (re-register it under a new name)", registry.ErrInvalid, d.Name, why)
		}
		switch {
		case d.Revoked && !cur.Revoked:
			if err := step(s.revokeDevice(&api.RevokeDeviceRequest{Name: d.Name}), "- device "+d.Name+": revoked"); err != nil {
				return nil, err
			}
		case !d.Revoked && cur.Revoked:
			return nil, fmt.Errorf("%w: device %s is revoked: a revoked device is never reinstated (register the host under a new name)", registry.ErrInvalid, d.Name)
		}
	}
	// A device is revoked only by saying so (revoked: true): one left
	// out is a file cut short or a slip, not an order to cut it off.
	var missing []string
	for d := range st.Devices.All() {
		if _, ok := inFile[d.Name]; !ok && !d.Revoked && !d.Removed {
			missing = append(missing, d.Name)
		}
	}
	if len(missing) > 0 {
		more := ""
		if len(missing) > 5 {
			more, missing = fmt.Sprintf(" and %d more", len(missing)-5), missing[:5]
		}
		return nil, fmt.Errorf("%w: devices %s%s are registered but not in the file: list each (with revoked: true to revoke it; enclave admin export writes them all)", registry.ErrInvalid, strings.Join(missing, ", "), more)
	}

	// Pair rules: exactly the file's.
	var allow, forbid []registry.Pair
	for _, p := range f.Pairs.Allow {
		allow = append(allow, pair(p))
	}
	for _, p := range f.Pairs.Forbid {
		forbid = append(forbid, pair(p))
	}
	before := [2][]registry.Pair{slices.Clone(st.Allowed), slices.Clone(st.Forbidden)}
	if err := st.SetRules(allow, forbid, s.now()); err != nil {
		return nil, err
	}
	for k, verb := range []string{"allow", "forbid"} {
		now := [2][]registry.Pair{st.Allowed, st.Forbidden}[k]
		for _, p := range now {
			if !slices.Contains(before[k], p) {
				*plan = append(*plan, "+ pair "+verb+" "+st.PairName(p))
			}
		}
		for _, p := range before[k] {
			if !slices.Contains(now, p) {
				*plan = append(*plan, "- pair "+verb+" "+st.PairName(p))
			}
		}
	}

	// Grants: each device's exactly the file's (a grant withdrawn rotates
	// its pairs, as grant revoke does).
	wantGrant := map[string]orgfile.Grant{}
	for _, g := range f.Grants {
		wantGrant[g.Device] = g
	}
	var names []string
	for _, g := range st.Grants {
		names = append(names, g.Device)
	}
	for _, g := range f.Grants {
		names = append(names, g.Device)
	}
	slices.Sort(names)
	for _, name := range slices.Compact(names) {
		cur, had := st.Grant(name)
		g, wanted := wantGrant[name]
		var ps []registry.Pair
		for _, p := range g.Pairs {
			ps = append(ps, pair(p))
		}
		slices.SortFunc(ps, registry.ComparePairs)
		if had && wanted && cur.All && g.All {
			continue
		}
		if had && wanted && !cur.All && !g.All {
			// Pair by pair: only the pairs withdrawn rotate; those kept go on.
			var gone, added []*api.Pair
			var goneNames, addedNames []string
			for _, p := range cur.Pairs {
				if !slices.Contains(ps, p) {
					gone, goneNames = append(gone, apiPair(p)), append(goneNames, st.PairName(p))
				}
			}
			for _, p := range ps {
				if !slices.Contains(cur.Pairs, p) {
					added, addedNames = append(added, apiPair(p)), append(addedNames, st.PairName(p))
				}
			}
			if len(gone) > 0 {
				if err := step(s.revokeGrant(&api.RevokeGrantRequest{Device: name, Pairs: gone}), "- grant of "+name+": "+strings.Join(goneNames, ", ")); err != nil {
					return nil, err
				}
			}
			if len(added) > 0 {
				if err := step(s.addGrant(&api.AddGrantRequest{Device: name, Pairs: added}), "+ grant of "+name+": "+strings.Join(addedNames, ", ")); err != nil {
					return nil, err
				}
			}
			continue
		}
		if had {
			if err := step(s.revokeGrant(&api.RevokeGrantRequest{Device: name}), "- grant of "+name); err != nil {
				return nil, err
			}
		}
		if wanted {
			req := &api.AddGrantRequest{Device: name, All: g.All}
			for _, p := range ps {
				req.Pairs = append(req.Pairs, apiPair(p))
			}
			what := strings.Join(g.Pairs, ", ")
			if g.All {
				what = "everything"
			}
			if err := step(s.addGrant(req), "+ grant of "+name+": "+what); err != nil {
				return nil, err
			}
		}
	}

	// Assertions the file adds.
	for _, a := range wantAsserts {
		if !slices.ContainsFunc(st.Assertions, a.Equal) {
			if err := st.AddAssertion(a); err != nil {
				return nil, err
			}
			*plan = append(*plan, "+ assertion "+st.Describe(a))
		}
	}
	return rot, nil
}

// deviceDiffers says how a registered device's identity differs from the
// file's (empty: it does not).
func deviceDiffers(st *registry.State, cur *registry.Device, d orgfile.Device, id func(string) keys.EnclaveID) string {
	var enclave keys.EnclaveID
	if d.Enclave != "" {
		enclave = id(d.Enclave)
	}
	var sid *uint32
	if cur.ServerID != nil {
		k := uint32(*cur.ServerID)
		sid = &k
	}
	switch {
	case string(cur.Role) != d.Role:
		return "its role is " + string(cur.Role)
	case cur.Enclave != enclave:
		return "its enclave is " + st.ID(cur.Enclave)
	case (sid == nil) != (d.ServerID == nil) || (sid != nil && *sid != *d.ServerID):
		return "its server id differs"
	case d.Address != "" && cur.Overlay != d.Address:
		return "its address is " + cur.Overlay
	}
	return ""
}

// awaitJoin registers the file's device d awaiting its host, with a join
// token living ttl (registry.AwaitJoin), and returns the token.
func (s *Service) awaitJoin(st *registry.State, d orgfile.Device, id func(string) keys.EnclaveID, ttl time.Duration) (*api.ApplyOrgToken, error) {
	dev := registry.Device{Name: d.Name, Role: ca.Role(d.Role)}
	if d.Enclave != "" {
		dev.Enclave = id(d.Enclave)
	}
	if d.ServerID != nil {
		k := keys.ServerID(*d.ServerID)
		dev.ServerID = &k
	}
	token := newJoinToken()
	t := registry.JoinToken{Hash: tokenHash(token), Device: dev, Overlay: d.Address, Expires: s.now().Add(ttl)}
	if err := st.AwaitJoin(t, s.now()); err != nil {
		return nil, err
	}
	cur, _ := st.Device(d.Name)
	return &api.ApplyOrgToken{Device: d.Name, Token: token, Expires: timestamppb.New(t.Expires), Overlay: cur.Overlay}, nil
}

// assertionsOf reads the file's assertions.
func assertionsOf(f *orgfile.File, pair func(string) registry.Pair) ([]registry.Assertion, error) {
	var out []registry.Assertion
	for _, a := range f.Assertions {
		switch {
		case a.Never != nil:
			out = append(out, registry.Assertion{Kind: registry.AssertNever, Reader: a.Never.Reader, Pair: pair(a.Never.Pair)})
		case a.Always != nil:
			out = append(out, registry.Assertion{Kind: registry.AssertAlways, Reader: a.Always.Reader, Pair: pair(a.Always.Pair)})
		case a.Only != nil:
			out = append(out, registry.Assertion{Kind: registry.AssertOnly, Pair: pair(a.Only.Pair), Readers: a.Only.Readers}.Normal())
		default:
			return nil, errors.New("orgfile: an empty assertion") // Parse refuses these
		}
	}
	return out, nil
}
