package api

import (
	"context"
	"errors"
)

// ErrNoChange: a PreviewRequest that names no change.
var ErrNoChange = errors.New("api: no change given")

// Apply makes the registry change req describes with the change's own
// RPC, so that the request a dry run (Preview) answers for is exactly the
// one applied. Rotate's reply is given as an AdminReply.
func Apply(ctx context.Context, a AdminClient, req *PreviewRequest) (*AdminReply, error) {
	switch x := req.GetChange().(type) {
	case *PreviewRequest_AddEnclave:
		return a.AddEnclave(ctx, x.AddEnclave)
	case *PreviewRequest_AddDevice:
		return a.AddDevice(ctx, x.AddDevice)
	case *PreviewRequest_RevokeDevice:
		return a.RevokeDevice(ctx, x.RevokeDevice)
	case *PreviewRequest_RemoveDevice:
		return a.RemoveDevice(ctx, x.RemoveDevice)
	case *PreviewRequest_AllowPair:
		return a.AllowPair(ctx, x.AllowPair)
	case *PreviewRequest_ForbidPair:
		return a.ForbidPair(ctx, x.ForbidPair)
	case *PreviewRequest_AddGrant:
		return a.AddGrant(ctx, x.AddGrant)
	case *PreviewRequest_RevokeGrant:
		return a.RevokeGrant(ctx, x.RevokeGrant)
	case *PreviewRequest_AddAssertion:
		return a.AddAssertion(ctx, x.AddAssertion)
	case *PreviewRequest_RemoveAssertion:
		return a.RemoveAssertion(ctx, x.RemoveAssertion)
	case *PreviewRequest_SetEnclaveKeyMode:
		return a.SetEnclaveKeyMode(ctx, x.SetEnclaveKeyMode)
	case *PreviewRequest_Rotate:
		r, err := a.Rotate(ctx, x.Rotate)
		if err != nil {
			return nil, err
		}
		return &AdminReply{Message: "rotation requested", Rotations: r.GetRotations()}, nil
	}
	return nil, ErrNoChange
}

// OrgFilePiece is how much of an organisation file one ApplyOrg request
// carries: well under the key service's limit on a message.
const OrgFilePiece = 32 << 10

// ApplyOrgFile sends req's file to the key service in pieces (ApplyOrg)
// and returns its answer.
func ApplyOrgFile(ctx context.Context, a AdminClient, req *ApplyOrgRequest) (*ApplyOrgReply, error) {
	stream, err := a.ApplyOrg(ctx)
	if err != nil {
		return nil, err
	}
	file := req.GetFile()
	first := true
	for first || len(file) > 0 {
		n := min(len(file), OrgFilePiece)
		piece := &ApplyOrgRequest{File: file[:n]}
		if first {
			piece.DryRun, piece.TokenTtlSeconds = req.GetDryRun(), req.GetTokenTtlSeconds()
		}
		if err := stream.Send(piece); err != nil {
			break // the key service ended the call: CloseAndRecv says why
		}
		file, first = file[n:], false
	}
	return stream.CloseAndRecv()
}
