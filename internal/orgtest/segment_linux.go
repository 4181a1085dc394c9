//go:build linux

package orgtest

import (
	"encoding/binary"
	"net"
	"net/netip"
	"unsafe"

	"golang.org/x/sys/unix"
)

// SendSegmented sends payload from c to dst as one offloaded run that the
// kernel cuts into datagrams of size bytes (the last may be shorter),
// whatever the bytes look like: what a client holding its SA's keys can
// send to make a run's bytes suggest other boundaries than its real ones.
func SendSegmented(c *net.UDPConn, dst netip.AddrPort, payload []byte, size int) error {
	oob := make([]byte, unix.CmsgSpace(2))
	h := (*unix.Cmsghdr)(unsafe.Pointer(&oob[0]))
	h.Level, h.Type = unix.SOL_UDP, unix.UDP_SEGMENT
	h.SetLen(unix.CmsgLen(2))
	binary.NativeEndian.PutUint16(oob[unix.CmsgLen(0):], uint16(size))
	_, _, err := c.WriteMsgUDPAddrPort(payload, oob, dst)
	return err
}
