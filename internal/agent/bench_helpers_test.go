package agent

import (
	"crypto/rand"
	"encoding/binary"
	"io"

	"golang.org/x/crypto/curve25519"
	"golang.zx2c4.com/wireguard/device"
)

func rand32(b []byte) (int, error) { return rand.Read(b) }

func publicOf(k device.NoisePrivateKey) device.NoisePublicKey {
	var p device.NoisePublicKey
	out, _ := curve25519.X25519(k[:], curve25519.Basepoint)
	copy(p[:], out)
	return p
}

// writeLE writes a wireguard-go message struct in its wire form (little
// endian, field by field), as its own send path does.
func writeLE(w io.Writer, msg any) { binary.Write(w, binary.LittleEndian, msg) }
