//go:build !linux

package lab

import (
	"context"
	"errors"
	"fmt"
)

// ErrNetns: the namespaced lab cannot run here.
var ErrNetns = errors.New("lab --netns")

// RunNetns fails: network namespaces are Linux's.
func RunNetns(context.Context, Config) (*Report, error) {
	return nil, fmt.Errorf("%w needs Linux (network namespaces)", ErrNetns)
}
