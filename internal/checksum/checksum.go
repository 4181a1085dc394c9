// Package checksum is the Internet checksum (RFC 1071) of IPv4 headers,
// ICMP, and UDP with its pseudo-header: what the agent writes into the
// ICMP errors it answers with, the gateway into the handshakes it tags,
// and the lab into its pings.
package checksum

// Sum adds b, as big-endian 16-bit words (an odd last byte padded with
// zero), to the ones'-complement sum c and folds the result to 16 bits.
// Sums chain: Sum(Sum(0, a), b) is the sum of a then b when a has an even
// length. The checksum field is the complement, ^Sum(0, ...).
func Sum(c uint16, b []byte) uint16 {
	acc := uint32(c)
	for len(b) >= 2 {
		acc += uint32(b[0])<<8 | uint32(b[1])
		b = b[2:]
	}
	if len(b) == 1 {
		acc += uint32(b[0]) << 8
	}
	for acc > 0xffff {
		acc = acc>>16 + acc&0xffff
	}
	return uint16(acc)
}
