//go:build !linux

package lab

import "errors"

// udpReceiveErrors is not known outside Linux.
func udpReceiveErrors() (int64, error) {
	return 0, errors.New("lab: UDP receive-buffer errors are read on Linux only")
}
