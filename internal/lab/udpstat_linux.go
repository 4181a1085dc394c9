package lab

import (
	"bufio"
	"errors"
	"os"
	"strconv"
	"strings"
)

// udpReceiveErrors is the machine's count of UDP datagrams dropped for a
// full receive buffer (RcvbufErrors in /proc/net/snmp): on loopback, the
// one place a datagram between the bench's processes can be lost.
func udpReceiveErrors() (int64, error) {
	f, err := os.Open("/proc/net/snmp")
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	var names []string
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) == 0 || fields[0] != "Udp:" {
			continue
		}
		if names == nil {
			names = fields
			continue
		}
		for i, n := range names {
			if n == "RcvbufErrors" && i < len(fields) {
				return strconv.ParseInt(fields[i], 10, 64)
			}
		}
	}
	return 0, errors.New("lab: no Udp RcvbufErrors in /proc/net/snmp")
}
