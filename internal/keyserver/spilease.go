package keyserver

import (
	"context"
	"errors"
	"fmt"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/enclavekeys/enclave/internal/api"
	"github.com/enclavekeys/enclave/internal/audit"
	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/registry"
)

// LeaseSPIs implements api.KeyServiceServer: a range of counter values of
// one of the caller's server keys, each handed out once. The range is
// committed to the store (bbolt or etcd, in one atomic update) before it is
// returned, so no crash of the server or of any replica gives it twice; a
// range whose answer is lost is only wasted.
func (s *Service) LeaseSPIs(ctx context.Context, req *api.LeaseSPIsRequest) (*api.SPILease, error) {
	const rpc = "LeaseSPIs"
	c, err := s.authorize(ctx, rpc, ca.RoleServer)
	if err != nil {
		return nil, err
	}
	switch {
	case s.tier == TierOrg:
		return nil, s.refuse(c, rpc, codes.FailedPrecondition, "this is an org-tier key server; servers lease SPIs from their enclave's key server")
	case s.tier == TierEnclave && c.state.TopEnclave(c.device.Enclave) != s.enclave:
		return nil, s.refuse(c, rpc, codes.PermissionDenied, fmt.Sprintf("this key server serves enclave %s; %s is in enclave %s", c.state.ID(s.enclave), c.id.Name, c.state.ID(c.device.Enclave)))
	}
	j, err := enclaveID(req.GetPeer())
	if err != nil {
		return nil, s.refuse(c, rpc, codes.InvalidArgument, err.Error())
	}
	i, k, g := c.device.Enclave, *c.device.ServerID, keys.Generation(req.GetGeneration())
	var first uint64
	var n uint32
	_, err = s.store.Update(ctx, func(st *registry.State) error {
		var err error
		first, n, err = st.LeaseSPIs(i, j, k, g, req.GetCount())
		return err
	})
	if err != nil {
		code := adminCode(err)
		if errors.Is(err, registry.ErrSPIsExhausted) {
			code = codes.ResourceExhausted
		}
		if code == codes.Unavailable {
			return nil, status.Error(code, "store unavailable: "+err.Error())
		}
		return nil, s.refuse(c, rpc, code, err.Error())
	}
	kk, gg := uint32(k), uint32(g)
	e := audit.Entry{IDs: &audit.IDs{Enclave: uint16(i), Peer: uint16(j), Server: &kk}, Generation: &gg}
	if err := s.allow(c, rpc, []audit.Entry{e}, fmt.Sprintf("SPI counter values %d to %d", first, first+uint64(n)-1)); err != nil {
		return nil, err
	}
	return &api.SPILease{Enclave: uint32(i), Peer: uint32(j), Server: kk, Generation: gg, First: first, Count: n}, nil
}
