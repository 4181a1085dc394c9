package keyserver

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/enclavekeys/enclave/internal/api"
	"github.com/enclavekeys/enclave/internal/audit"
	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/echo"
	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/registry"
)

// change is one admin mutation: the RPC's name, the identifiers it is
// about (for the audit log), and what it does to a registry. fn has no
// effect outside the state it is given, so that it can be retried (etcd)
// or run on a copy (Preview).
type change struct {
	rpc string
	ids *audit.IDs
	fn  func(st *registry.State) ([]registry.RotationEvent, string, error)
}

// apply runs one admin change: it checks the caller is an admin, applies
// it atomically in the store, audits the outcome, wakes the scheduler, and
// tells watchers of the rotations it caused.
func (s *Service) apply(ctx context.Context, ch change) (*api.AdminReply, error) {
	c, err := s.authorize(ctx, ch.rpc, ca.RoleAdmin)
	if err != nil {
		return nil, err
	}
	if err := s.takesChanges(c, ch.rpc); err != nil {
		return nil, err
	}
	return s.commit(ctx, c, ch.rpc, ch.ids, ch.fn)
}

// holdChange refuses the change that made st from the registry of
// before (its assertions: assertsBefore) if it breaks an assertion the
// registry before did not.
func (s *Service) holdChange(before *sightSnapshot, assertsBefore []registry.Assertion, st *registry.State) error {
	if len(assertsBefore) == 0 && len(st.Assertions) == 0 {
		return nil // nothing to hold (and no map to build)
	}
	if before.samePolicy(st) && slices.EqualFunc(assertsBefore, st.Assertions, registry.Assertion.Equal) {
		// Only the devices the change touched can break an assertion
		// now: judged on a map of them, not of the fleet.
		names := changedDevices(st)
		if len(names) == 0 {
			return nil
		}
		was := brokenOf(st, assertsBefore, statusOfDevices(before.before, names))
		var fresh []string
		for _, b := range brokenOf(st, st.Assertions, statusOfDevices(st, names)) {
			if !slices.Contains(was, b) {
				fresh = append(fresh, b)
			}
		}
		if len(fresh) > 0 {
			return assertionError(fresh)
		}
		return nil
	}
	return holdAssertions(brokenOf(st, assertsBefore, before.status()), st)
}

// takesChanges refuses registry changes where this tier leaves them to
// another: enclave tiers under an org tier leave admin to it; in
// enclave-key mode there is no org tier, so they take changes.
func (s *Service) takesChanges(c *caller, rpc string) error {
	if _, exchange := s.pairKeys.(*ExchangeSource); s.tier == TierEnclave && !exchange {
		return s.refuse(c, rpc, codes.FailedPrecondition, "admin changes go to the org tier")
	}
	return nil
}

// commit runs fn on the registry in one store update, audited as c's
// rpc before it is committed, with the rotations it causes and the sight
// it gives and takes (sight.go), all named as one change.
func (s *Service) commit(ctx context.Context, c *caller, rpc string, ids *audit.IDs, fn func(st *registry.State) ([]registry.RotationEvent, string, error)) (*api.AdminReply, error) {
	var rotations []registry.RotationEvent
	var msg string
	var attempts []string // the changes named in the log for attempts of this one
	_, err := s.store.Update(ctx, func(st *registry.State) error {
		before := snapshotSight(st)
		assertsBefore := slices.Clone(st.Assertions)
		var err error
		if rotations, msg, err = fn(st); err != nil {
			return err
		}
		// The assertions are judged only when the change touched sight
		// or them: a refused join, an endpoint, a lease cost no map.
		if err := s.holdChange(before, assertsBefore, st); err != nil {
			if rpc == "AddAssertion" { // not a change breaking it: it does not hold now
				return fmt.Errorf("%w: refused, the assertion does not hold now: %s (add the readers it leaves out, or withdraw what gives them sight, first)", registry.ErrAssertion,
					strings.ReplaceAll(strings.TrimPrefix(strings.TrimSuffix(err.Error(), assertionAdvice), registry.ErrAssertion.Error()+": refused, it would break "), " would read ", " reads "))
			}
			return err
		}
		// Nothing is committed unless it is audited: the entries go to the
		// log before the commit they describe, and a failed write aborts it.
		// The change's entry names the last change committed before it,
		// and the registry takes its name in the same commit: a change
		// whose entries stand but whose commit was lost (kill -9 between
		// the two) is then off the chain of committed changes (sight.go).
		name := changeName()
		attempts = append(attempts, name)
		if err := s.record(c, rpc, audit.Entry{IDs: ids, Decision: audit.Allow, Reason: msg, Change: name, Follows: st.LastChange}); err != nil {
			return err
		}
		st.LastChange = name
		if err := s.auditRotations(rotations, name); err != nil {
			return err
		}
		if err := s.auditAssertions(assertsBefore, st, name); err != nil {
			return err
		}
		return s.auditSight(before, st, name)
	})
	if err != nil && len(attempts) > 0 {
		// The outcome may be unknown (etcd: a transaction that timed out
		// may have applied): what the store holds decides, never the
		// error alone. A change that was made is answered as made.
		if st, verr := s.store.View(ctx); verr == nil && slices.Contains(attempts, st.LastChange) {
			s.log.Warn("the store answered a change with an error, but it was committed", "caller", c.id.String(), "rpc", rpc, "change", st.LastChange, "err", err)
			if st.LastChange != attempts[len(attempts)-1] {
				msg, rotations = "committed (after a retry the store reported as failed)", nil
			}
			if others := slices.DeleteFunc(slices.Clone(attempts), func(a string) bool { return a == st.LastChange }); len(others) > 0 {
				s.void(c, rpc, ids, others, fmt.Sprintf("only change %s was committed, the entries of %s are void", st.LastChange, strings.Join(others, ", ")))
			}
			err, attempts = nil, []string{st.LastChange}
		}
	}
	if err != nil && errors.Is(err, registry.ErrAssertion) && c.id.Role != ca.RoleAdmin {
		// The audit log names the assertion and the reader; a host that
		// is not an admin (a joining one is anonymous) learns no policy.
		s.deny(c, rpc, "", ids, err.Error())
		return nil, status.Error(codes.FailedPrecondition, "refused: it would break a sight assertion (an admin finds which in the audit log)")
	}
	switch {
	case err != nil && len(attempts) > 0:
		// The log holds entries for a change that did not happen: say so.
		s.metrics.refused(rpc)
		s.void(c, rpc, ids, attempts, fmt.Sprintf("not committed (the entries of change %s are void): %v", strings.Join(attempts, ", "), err))
		if status.Code(err) == codes.Unavailable {
			return nil, err
		}
		return nil, status.Error(adminCode(err), err.Error())
	case err != nil:
		s.deny(c, rpc, "", ids, err.Error())
		return nil, status.Error(adminCode(err), err.Error())
	case len(attempts) > 1:
		// A store that retries after a conflict (etcd) ran the change again.
		last := len(attempts) - 1
		s.void(c, rpc, ids, attempts[:last], fmt.Sprintf("retried after a conflict: only change %s was committed, the entries of %s are void", attempts[last], strings.Join(attempts[:last], ", ")))
	}
	s.afterRotations(rotations)
	reply := &api.AdminReply{Message: msg}
	for _, r := range rotations {
		reply.Rotations = append(reply.Rotations, apiOutcome(r))
	}
	return reply, nil
}

func adminCode(err error) codes.Code {
	switch {
	case errors.Is(err, registry.ErrInvalid):
		return codes.InvalidArgument
	case errors.Is(err, registry.ErrNotFound):
		return codes.NotFound
	case errors.Is(err, registry.ErrExists):
		return codes.AlreadyExists
	case errors.Is(err, registry.ErrNotAllowed), errors.Is(err, registry.ErrAssertion):
		return codes.FailedPrecondition
	case errors.Is(err, registry.ErrMismatch):
		return codes.PermissionDenied
	case errors.Is(err, errIssuanceLimit):
		return codes.ResourceExhausted
	}
	return codes.Unavailable
}

func apiOutcome(r registry.RotationEvent) *api.RotationOutcome {
	return &api.RotationOutcome{Pair: apiPair(r.Pair), Outcome: string(r.Outcome), Generation: uint32(r.Generation), At: timestamppb.New(r.At), Reason: r.Reason}
}

// void records that the named changes' entries stand for nothing: never
// throttled, as a replay of the log (enclave audit readers) relies on it.
func (s *Service) void(c *caller, rpc string, ids *audit.IDs, changes []string, reason string) {
	if err := s.record(c, rpc, audit.Entry{IDs: ids, Decision: audit.Deny, Reason: reason, Voids: changes}); err != nil {
		s.log.Error("audit write failed", "rpc", rpc, "err", err)
	}
	s.log.Warn("change not committed", "caller", c.id.String(), "rpc", rpc, "reason", reason)
}

// auditSight writes what the change from before to after does to who can
// read what, as the change named name. Like auditRotations, it runs
// inside the store update.
func (s *Service) auditSight(before *sightSnapshot, after *registry.State, name string) error {
	for _, e := range before.entries(after) {
		e.Change = name
		if err := s.audit.Append(boundEntry(e)); err != nil {
			s.log.Error("audit write failed", "rpc", "sight", "err", err)
			return status.Error(codes.Unavailable, "audit log unavailable; nothing changed")
		}
	}
	return nil
}

// auditAssertions writes one entry per sight assertion the change named
// name kept or dropped ("kept: never: {...}", "dropped: ..."), whichever
// command made it, so that the audit's replay knows when each was kept
// (enclave audit readers --never ...). An assertion fits one entry
// (registry.MaxOnlyReaders).
func (s *Service) auditAssertions(before []registry.Assertion, after *registry.State, name string) error {
	var lines []string
	for _, a := range after.Assertions {
		if !slices.ContainsFunc(before, a.Equal) {
			lines = append(lines, "kept: "+after.Describe(a))
		}
	}
	for _, a := range before {
		if !slices.ContainsFunc(after.Assertions, a.Equal) {
			lines = append(lines, "dropped: "+after.Describe(a))
		}
	}
	for _, line := range lines {
		e := audit.Entry{Caller: "keyserver", Role: string(ca.RoleKeyserver), RPC: AuditAssertion, Decision: audit.Allow, Reason: line, Change: name}
		if err := s.audit.Append(boundEntry(e)); err != nil {
			s.log.Error("audit write failed", "rpc", AuditAssertion, "err", err)
			return status.Error(codes.Unavailable, "audit log unavailable; nothing changed")
		}
	}
	return nil
}

// AuditAssertion is the rpc of the audit entries that say a change kept
// or dropped a sight assertion.
const AuditAssertion = "assertion"

// auditRotations writes one entry per rotation, as the change named name
// (none: the scheduler's). It runs inside the store update that makes
// them, so that none is committed unaudited.
func (s *Service) auditRotations(rotations []registry.RotationEvent, name string) error {
	for _, r := range rotations {
		g := uint32(r.Generation)
		e := audit.Entry{Caller: "keyserver", Role: string(ca.RoleKeyserver), RPC: "rotate", Level: "pair",
			IDs: &audit.IDs{Enclave: uint16(r.Pair.A), Peer: uint16(r.Pair.B)}, Generation: &g, Decision: audit.Allow,
			Reason: fmt.Sprintf("%s: %s", r.Outcome, r.Reason), Change: name}
		if err := s.audit.Append(boundEntry(e)); err != nil {
			s.log.Error("audit write failed", "rpc", "rotate", "err", err)
			return status.Error(codes.Unavailable, "audit log unavailable; nothing changed")
		}
	}
	return nil
}

// afterRotations counts and logs committed rotations and wakes the
// scheduler (a delayed rotation may now be the next thing due). Watchers
// hear of the change from the store's watch (see watchStore), on every
// replica alike.
func (s *Service) afterRotations(rotations []registry.RotationEvent) {
	for _, r := range rotations {
		s.metrics.rotation(string(r.Outcome))
		s.log.Info("rotation", "pair", r.Pair.String(), "outcome", string(r.Outcome), "generation", r.Generation, "reason", r.Reason)
	}
	select {
	case s.kick <- struct{}{}:
	default:
	}
}

func enclaveID(v uint32) (keys.EnclaveID, error) {
	if v == 0 || v > 0xffff {
		return 0, fmt.Errorf("%w: enclave id %d must be 1 to 65535", registry.ErrInvalid, v)
	}
	return keys.EnclaveID(v), nil
}

// AddEnclave implements api.AdminServer.
func (s *Service) AddEnclave(ctx context.Context, req *api.AddEnclaveRequest) (*api.AdminReply, error) {
	return s.apply(ctx, s.addEnclave(req))
}

func (s *Service) addEnclave(req *api.AddEnclaveRequest) change {
	return change{"AddEnclave", &audit.IDs{Enclave: uint16(req.GetId())}, func(st *registry.State) ([]registry.RotationEvent, string, error) {
		id, err := enclaveID(req.GetId())
		if err != nil {
			return nil, "", err
		}
		if err := st.AddEnclave(id, req.GetName()); err != nil {
			return nil, "", err
		}
		msg := fmt.Sprintf("enclave %s (%s) added", st.ID(id), req.GetName())
		if req.GetAddresses() != "" || req.GetNetwork() != "" {
			m, err := setAddresses(st, id, req.GetAddresses(), req.GetNetwork())
			if err != nil {
				return nil, "", err
			}
			msg += "; " + m
		}
		return nil, msg, nil
	}}
}

// SetEnclaveAddresses implements api.AdminServer.
func (s *Service) SetEnclaveAddresses(ctx context.Context, req *api.SetEnclaveAddressesRequest) (*api.AdminReply, error) {
	return s.apply(ctx, change{"SetEnclaveAddresses", &audit.IDs{Enclave: uint16(req.GetEnclave())}, func(st *registry.State) ([]registry.RotationEvent, string, error) {
		id, err := enclaveID(req.GetEnclave())
		if err != nil {
			return nil, "", err
		}
		msg, err := setAddresses(st, id, req.GetAddresses(), req.GetNetwork())
		return nil, fmt.Sprintf("enclave %d: %s", id, msg), err
	}})
}

// SetEnclaveKeyMode implements api.AdminServer.
func (s *Service) SetEnclaveKeyMode(ctx context.Context, req *api.SetEnclaveKeyModeRequest) (*api.AdminReply, error) {
	return s.apply(ctx, s.setEnclaveKeyMode(req))
}

func (s *Service) setEnclaveKeyMode(req *api.SetEnclaveKeyModeRequest) change {
	return change{"SetEnclaveKeyMode", &audit.IDs{Enclave: uint16(req.GetEnclave())}, func(st *registry.State) ([]registry.RotationEvent, string, error) {
		id, err := enclaveID(req.GetEnclave())
		if err != nil {
			return nil, "", err
		}
		changed, err := st.SetEnclaveKeyMode(id, req.GetEnclaveKey())
		if err != nil {
			return nil, "", err
		}
		mode := "keys from the org key"
		if req.GetEnclaveKey() {
			mode = "enclave-key mode (its key server's own enclave key)"
		}
		if !changed {
			return nil, fmt.Sprintf("enclave %s: already %s", st.ID(id), mode), nil
		}
		return nil, fmt.Sprintf("enclave %s: %s", st.ID(id), mode), nil
	}}
}

// setAddresses parses and sets an enclave's address block.
func setAddresses(st *registry.State, id keys.EnclaveID, addresses, network string) (string, error) {
	var pool, net netip.Prefix
	var err error
	if addresses != "" {
		if pool, err = netip.ParsePrefix(addresses); err != nil {
			return "", fmt.Errorf("%w: addresses %q: want a prefix, as 100.64.3.0/24", registry.ErrInvalid, echo.Cut(addresses))
		}
	}
	if network != "" {
		if net, err = netip.ParsePrefix(network); err != nil {
			return "", fmt.Errorf("%w: network %q: want a prefix, as 100.64.0.0/16", registry.ErrInvalid, echo.Cut(network))
		}
	}
	if err := st.SetAddresses(id, pool, net); err != nil {
		return "", err
	}
	if !pool.IsValid() {
		return "addresses are given by hand", nil
	}
	return fmt.Sprintf("addresses handed out from %s (certificates name %s)", pool.Masked(), net.Masked()), nil
}

// AddDevice implements api.AdminServer. A device entering an enclave
// rotates the enclave's pairs.
func (s *Service) AddDevice(ctx context.Context, req *api.AddDeviceRequest) (*api.AdminReply, error) {
	return s.apply(ctx, s.addDevice(req))
}

func (s *Service) addDevice(req *api.AddDeviceRequest) change {
	return change{"AddDevice", &audit.IDs{Device: req.GetName(), Enclave: uint16(req.GetEnclave())}, func(st *registry.State) ([]registry.RotationEvent, string, error) {
		if err := checkName("device name", req.GetName()); err != nil {
			return nil, "", err
		}
		if err := checkFingerprint(req.GetFingerprint()); err != nil {
			return nil, "", err
		}
		role, err := ca.ParseRole(req.GetRole())
		if err != nil {
			return nil, "", fmt.Errorf("%w: %v", registry.ErrInvalid, err)
		}
		d := registry.Device{Name: req.GetName(), Role: role, Fingerprint: req.GetFingerprint(), Overlay: req.GetOverlay()}
		if req.GetEnclave() != 0 {
			if d.Enclave, err = enclaveID(req.GetEnclave()); err != nil {
				return nil, "", err
			}
		}
		if req.ServerId != nil {
			k := keys.ServerID(req.GetServerId())
			d.ServerID = &k
		}
		if err := st.AddDevice(d); err != nil {
			return nil, "", err
		}
		msg := fmt.Sprintf("device %s (%s) added", d.Name, d.Role)
		if added, ok := st.Device(d.Name); ok && added.Overlay != "" {
			msg += fmt.Sprintf("; overlay address %s (its certificate must carry it: --ip %s)", added.Overlay, added.Overlay)
		}
		var rot []registry.RotationEvent
		if d.Enclave != 0 {
			rot, err = st.RotateEnclave(d.Enclave, fmt.Sprintf("device %s entered enclave %s", d.Name, st.ID(d.Enclave)), s.now(), s.rotation)
		}
		return rot, msg, err
	}}
}

// RevokeDevice implements api.AdminServer: the device is refused from now
// on, its watch streams end, and the pairs it held keys of rotate.
func (s *Service) RevokeDevice(ctx context.Context, req *api.RevokeDeviceRequest) (*api.AdminReply, error) {
	return s.apply(ctx, s.revokeDevice(req))
}

func (s *Service) revokeDevice(req *api.RevokeDeviceRequest) change {
	return change{"RevokeDevice", &audit.IDs{Device: req.GetName()}, func(st *registry.State) ([]registry.RotationEvent, string, error) {
		if err := checkName("device name", req.GetName()); err != nil {
			return nil, "", err
		}
		withdrawn := st.WithdrawToken(req.GetName())
		d, err := st.RevokeDevice(req.GetName(), s.now())
		if errors.Is(err, registry.ErrNotFound) && withdrawn {
			// Not joined yet: the token is what there was to revoke.
			return nil, fmt.Sprintf("the join token for %s is withdrawn: it can no longer be used", req.GetName()), nil
		}
		if err != nil {
			return nil, "", err
		}
		reason := fmt.Sprintf("device %s revoked", d.Name)
		var rot []registry.RotationEvent
		if d.Enclave != 0 {
			if rot, err = st.RotateEnclave(d.Enclave, reason, s.now(), s.rotation); err != nil {
				return nil, "", err
			}
		}
		for _, p := range st.GrantedPairs(d.Name) {
			ev, err := st.RequestRotation(p, reason, s.now(), s.rotation)
			if err != nil {
				return nil, "", err
			}
			rot = append(rot, ev)
		}
		msg := fmt.Sprintf("%s revoked: the key service refuses it from now on", d.Name)
		if len(rot) > 0 {
			msg += "; the pairs it held keys of rotate:"
		}
		return rot, msg, nil
	}}
}

// AllowPair implements api.AdminServer.
func (s *Service) AllowPair(ctx context.Context, req *api.AllowPairRequest) (*api.AdminReply, error) {
	return s.apply(ctx, s.allowPair(req))
}

func (s *Service) allowPair(req *api.AllowPairRequest) change {
	return pairChange("AllowPair", req.GetA(), req.GetB(), func(st *registry.State, a, b keys.EnclaveID) (string, error) {
		return "allowed", st.AllowPair(a, b, s.now())
	})
}

// ForbidPair implements api.AdminServer.
func (s *Service) ForbidPair(ctx context.Context, req *api.ForbidPairRequest) (*api.AdminReply, error) {
	return s.apply(ctx, s.forbidPair(req))
}

func (s *Service) forbidPair(req *api.ForbidPairRequest) change {
	return pairChange("ForbidPair", req.GetA(), req.GetB(), func(st *registry.State, a, b keys.EnclaveID) (string, error) {
		return "forbidden: its servers end its SAs, its gateways stop reading it", st.ForbidPair(a, b)
	})
}

// pairChange is an admin change of one pair's policy; fn says what
// became of the pair.
func pairChange(rpc string, ra, rb uint32, fn func(st *registry.State, a, b keys.EnclaveID) (string, error)) change {
	return change{rpc, &audit.IDs{Enclave: uint16(ra), Peer: uint16(rb)}, func(st *registry.State) ([]registry.RotationEvent, string, error) {
		a, err := enclaveID(ra)
		if err != nil {
			return nil, "", err
		}
		b, err := enclaveID(rb)
		if err != nil {
			return nil, "", err
		}
		what, err := fn(st, a, b)
		return nil, fmt.Sprintf("pair %s %s", st.PairName(registry.NewPair(a, b)), what), err
	}}
}

// AddGrant implements api.AdminServer.
func (s *Service) AddGrant(ctx context.Context, req *api.AddGrantRequest) (*api.AdminReply, error) {
	return s.apply(ctx, s.addGrant(req))
}

func (s *Service) addGrant(req *api.AddGrantRequest) change {
	return change{"AddGrant", &audit.IDs{Device: req.GetDevice()}, func(st *registry.State) ([]registry.RotationEvent, string, error) {
		if err := checkName("device", req.GetDevice()); err != nil {
			return nil, "", err
		}
		pairs, err := checkPairs(req.GetPairs())
		if err != nil {
			return nil, "", err
		}
		if err := st.AddGrant(req.GetDevice(), pairs, req.GetAll()); err != nil {
			return nil, "", err
		}
		names := make([]string, len(pairs))
		for i, p := range pairs {
			names[i] = st.PairName(p)
		}
		what := "[" + strings.Join(names, " ") + "]"
		if req.GetAll() {
			what = "everything"
		}
		return nil, fmt.Sprintf("%s granted %s", req.GetDevice(), what), nil
	}}
}

// RevokeGrant implements api.AdminServer; the withdrawn pairs rotate.
func (s *Service) RevokeGrant(ctx context.Context, req *api.RevokeGrantRequest) (*api.AdminReply, error) {
	return s.apply(ctx, s.revokeGrant(req))
}

func (s *Service) revokeGrant(req *api.RevokeGrantRequest) change {
	return change{"RevokeGrant", &audit.IDs{Device: req.GetDevice()}, func(st *registry.State) ([]registry.RotationEvent, string, error) {
		if err := checkName("device", req.GetDevice()); err != nil {
			return nil, "", err
		}
		pairs, err := checkPairs(req.GetPairs())
		if err != nil {
			return nil, "", err
		}
		before := st.GrantedPairs(req.GetDevice())
		if err := st.RevokeGrant(req.GetDevice(), pairs); err != nil {
			return nil, "", err
		}
		if len(pairs) == 0 {
			pairs = before
		}
		reason := fmt.Sprintf("grant of %s withdrawn", req.GetDevice())
		var rot []registry.RotationEvent
		for _, p := range pairs {
			ev, err := st.RequestRotation(p, reason, s.now(), s.rotation)
			if err != nil {
				return nil, "", err
			}
			rot = append(rot, ev)
		}
		return rot, reason, nil
	}}
}

// RemoveDevice implements api.AdminServer: a revoked device leaves the
// lists (it stays revoked).
func (s *Service) RemoveDevice(ctx context.Context, req *api.RemoveDeviceRequest) (*api.AdminReply, error) {
	return s.apply(ctx, s.removeDevice(req))
}

func (s *Service) removeDevice(req *api.RemoveDeviceRequest) change {
	return change{"RemoveDevice", &audit.IDs{Device: req.GetName()}, func(st *registry.State) ([]registry.RotationEvent, string, error) {
		if err := checkName("device name", req.GetName()); err != nil {
			return nil, "", err
		}
		d, err := st.RemoveDevice(req.GetName())
		if err != nil {
			return nil, "", err
		}
		return nil, fmt.Sprintf("%s removed: it stays revoked, and its name cannot be registered again", d.Name), nil
	}}
}

// Rotate implements api.AdminServer: an enclave's pairs, or one pair.
func (s *Service) Rotate(ctx context.Context, req *api.RotateRequest) (*api.RotateReply, error) {
	reply, err := s.apply(ctx, s.rotate(req))
	if err != nil {
		return nil, err
	}
	return &api.RotateReply{Rotations: reply.Rotations}, nil
}

func (s *Service) rotate(req *api.RotateRequest) change {
	return change{"Rotate", &audit.IDs{Enclave: uint16(req.GetEnclave())}, func(st *registry.State) ([]registry.RotationEvent, string, error) {
		switch {
		case req.GetEnclave() != 0 && req.GetPair() == nil:
			e, err := enclaveID(req.GetEnclave())
			if err != nil {
				return nil, "", err
			}
			if req.GetNow() {
				if _, ok := st.Enclave(e); !ok {
					return nil, "", fmt.Errorf("%w: enclave %d", registry.ErrNotFound, e)
				}
				var rot []registry.RotationEvent
				for _, p := range st.PairsOf(e) {
					ev, err := st.RotateNow(p, "admin rotate --now", s.now(), s.rotation)
					if err != nil {
						return nil, "", err
					}
					rot = append(rot, ev)
				}
				return rot, fmt.Sprintf("pairs of enclave %d rotated now", e), nil
			}
			rot, err := st.RotateEnclave(e, "admin rotate", s.now(), s.rotation)
			return rot, fmt.Sprintf("rotation of enclave %d requested", e), err
		case req.GetEnclave() == 0 && req.GetPair() != nil:
			ps, err := checkPairs([]*api.Pair{req.GetPair()})
			if err != nil {
				return nil, "", err
			}
			if req.GetNow() {
				ev, err := st.RotateNow(ps[0], "admin rotate --now", s.now(), s.rotation)
				return []registry.RotationEvent{ev}, fmt.Sprintf("pair %s rotated now", st.PairName(ps[0])), err
			}
			ev, err := st.RequestRotation(ps[0], "admin rotate", s.now(), s.rotation)
			return []registry.RotationEvent{ev}, fmt.Sprintf("rotation of pair %s requested", st.PairName(ps[0])), err
		}
		return nil, "", fmt.Errorf("%w: give an enclave or a pair", registry.ErrInvalid)
	}}
}

// Status implements api.AdminServer.
func (s *Service) Status(ctx context.Context, _ *api.StatusRequest) (*api.StatusReply, error) {
	const rpc = "Status"
	c, err := s.authorize(ctx, rpc, ca.RoleAdmin)
	if err != nil {
		return nil, err
	}
	if err := s.allow(c, rpc, nil, "status"); err != nil {
		return nil, err
	}
	st := statusOf(c.state)
	s.addSeen(st)
	return st, nil
}

// Layout implements api.AdminServer: the org's sub-enclave layout, by
// which admin tools read dotted enclave ids.
func (s *Service) Layout(ctx context.Context, _ *api.LayoutRequest) (*api.LayoutReply, error) {
	const rpc = "Layout"
	c, err := s.authorize(ctx, rpc, ca.RoleAdmin)
	if err != nil {
		return nil, err
	}
	return &api.LayoutReply{Layout: c.state.EnclaveLayout}, nil
}

// watchStore tells watch streams of every committed change, whichever
// replica made it.
func (s *Service) watchStore(ctx context.Context) {
	prev, err := s.store.View(ctx)
	if err != nil {
		prev = &registry.State{}
	}
	if x, ok := s.pairKeys.(*ExchangeSource); ok {
		x.Sync(ctx, prev)
	}
	for st := range s.store.Watch(ctx) {
		if x, ok := s.pairKeys.(*ExchangeSource); ok {
			x.Sync(ctx, st)
		}
		rot, revoked := st.Changes(prev)
		if len(rot) > 0 || len(revoked) > 0 {
			s.hub.publish(st, rot, revoked)
		}
		if pairs, grants := st.PolicyChanges(prev); len(pairs) > 0 || len(grants) > 0 || !slices.Equal(st.Enclaves, prev.Enclaves) {
			s.hub.publishChanges(st, prev, pairs, grants)
		}
		if eps := st.EndpointChanges(prev); len(eps) > 0 {
			s.hub.publishEndpoints(st, eps)
		}
		prev = st
		select { // another replica may have scheduled something
		case s.kick <- struct{}{}:
		default:
		}
	}
}

// Run carries out scheduled and delayed rotations, relays committed
// changes to watch streams and writes refusal summaries, until ctx ends.
func (s *Service) Run(ctx context.Context) error {
	// Logged by it when it fails: the replay then waits for the next
	// change to tell a lost commit.
	_ = s.auditStart(ctx)
	go s.watchStore(ctx)
	// Refusal summaries are written every flushInterval and once more
	// before Run returns, so that the owner may close the log after it.
	fctx, cancel := context.WithCancel(ctx)
	flushed := make(chan struct{})
	go func() {
		defer close(flushed)
		// Watch opens are written each second of real time (a batch, not
		// a schedule: the service's clock may stand still in a test).
		opens := time.NewTicker(opensInterval)
		defer opens.Stop()
		refusals := s.clock.After(flushInterval)
		for {
			select {
			case <-fctx.Done():
				s.flushWatchOpens(true)
				s.flushRefusals()
				return
			case <-opens.C:
				s.flushWatchOpens(false)
			case <-refusals:
				s.flushRefusals()
				refusals = s.clock.After(flushInterval)
			}
		}
	}()
	defer func() { cancel(); <-flushed; s.auditStop() }()
	go func() { // the stop ends the watch streams at once
		<-ctx.Done()
		s.stoppingOnce.Do(func() { close(s.stopping) })
	}()
	for {
		st, err := s.store.View(ctx)
		if err != nil {
			return err
		}
		wait := s.rotation.Interval
		if next := st.NextDue(s.rotation); !next.IsZero() {
			wait = max(next.Sub(s.clock.Now()), 0)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-s.kick:
			continue
		case <-s.clock.After(wait):
		}
		var rotations []registry.RotationEvent
		_, err = s.store.Update(ctx, func(st *registry.State) error {
			rotations = st.Tick(s.now(), s.rotation)
			return s.auditRotations(rotations, "")
		})
		if err != nil {
			s.log.Error("scheduled rotation failed", "err", err)
			continue
		}
		if len(rotations) > 0 {
			s.afterRotations(rotations)
		}
	}
}
