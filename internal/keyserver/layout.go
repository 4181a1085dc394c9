package keyserver

import (
	"context"
	"errors"
	"fmt"

	"github.com/enclavekeys/enclave/internal/audit"
	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/registry"
)

// ErrLayoutMismatch: the store was created with another enclave layout
// than the one the key server was started with.
var ErrLayoutMismatch = errors.New("keyserver: the store's enclave layout is not the one given")

// SetLayout makes l the organisation's sub-enclave layout (DESIGN §3a)
// at the start of a key server given one (enclave keyserver
// --enclave-layout). A registry with no enclaves takes it, in one audited
// change of the key server's own; one that has enclaves keeps the layout
// it was created with, and a start with another is refused: every key
// beneath a pair derives from it.
func (s *Service) SetLayout(ctx context.Context, l keys.Layout) error {
	st, err := s.store.View(ctx)
	if err != nil {
		return err
	}
	if st.Layout() == l {
		return nil
	}
	if len(st.Enclaves) > 0 || st.EnclaveLayout != "" {
		return fmt.Errorf("%w: the store's is %s, --enclave-layout says %s (a layout is chosen when the organisation is created: start with --enclave-layout %s, or without it)", ErrLayoutMismatch, st.Layout(), l, st.Layout())
	}
	_, err = s.store.Update(ctx, func(st *registry.State) error {
		if err := st.SetLayout(l); err != nil {
			return err
		}
		name := changeName()
		e := audit.Entry{Caller: "keyserver", Role: string(ca.RoleKeyserver), RPC: "SetLayout", Decision: audit.Allow,
			Reason: "enclave layout " + l.String() + " set for the new organisation", Change: name, Follows: st.LastChange}
		if err := s.audit.Append(boundEntry(e)); err != nil {
			return fmt.Errorf("keyserver: audit log: %w (nothing changed)", err)
		}
		st.LastChange = name
		return nil
	})
	if err != nil {
		return fmt.Errorf("keyserver: setting the enclave layout: %w", err)
	}
	s.log.Info("enclave layout set", "layout", l.String())
	return nil
}
