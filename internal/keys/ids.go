package keys

import (
	"encoding/hex"
	"fmt"
	"strconv"
	"strings"

	"github.com/enclavekeys/enclave/internal/echo"
)

// EnclaveID names an enclave. 0 is reserved and never valid.
type EnclaveID uint16

// ServerID names a server within the organisation.
type ServerID uint32

// Generation counts the rotations of an enclave pair's key.
type Generation uint32

// Parity is g mod 2, the value bit 31 of every SPI under g carries.
func (g Generation) Parity() uint32 { return uint32(g) & 1 }

// SPI is a PSP security parameter index: bit 31 is the generation parity
// and the low 31 bits are the SA's derivation input (the index, never 0).
type SPI uint32

// MaxSPIIndex is the largest SPI index.
const MaxSPIIndex = 1<<31 - 1

// NewSPI returns the SPI of index under generation g.
func NewSPI(g Generation, index uint32) (SPI, error) {
	if index == 0 {
		return 0, ErrSPIIndexZero
	}
	if index > MaxSPIIndex {
		return 0, fmt.Errorf("%w: SPI index %#x exceeds 31 bits", ErrSyntax, index)
	}
	return SPI(g.Parity()<<31 | index), nil
}

// Parity is bit 31 of the SPI: the parity of the generation it was made
// under.
func (s SPI) Parity() uint32 { return uint32(s) >> 31 }

// Index is the low 31 bits of the SPI.
func (s SPI) Index() uint32 { return uint32(s) & MaxSPIIndex }

// Valid reports whether the SPI can name an SA (its index is not 0).
func (s SPI) Valid() bool { return s.Index() != 0 }

// String is the SPI as on the wire: 8 lowercase hex digits.
func (s SPI) String() string {
	var b [4]byte
	b[0], b[1], b[2], b[3] = byte(s>>24), byte(s>>16), byte(s>>8), byte(s)
	return hex.EncodeToString(b[:])
}

// ParseSPI parses an SPI written as on the wire: exactly 8 hex digits,
// such as "80001234". Index 0 is refused with ErrSPIIndexZero.
func ParseSPI(text string) (SPI, error) {
	if len(text) != 8 {
		return 0, fmt.Errorf("%w: SPI %q must be exactly 8 hex digits", ErrSyntax, echo.Cut(text))
	}
	var b [4]byte
	if _, err := hex.Decode(b[:], []byte(text)); err != nil {
		return 0, fmt.Errorf("%w: SPI %q is not hex", ErrSyntax, echo.Cut(text))
	}
	s := SPI(uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3]))
	if !s.Valid() {
		return 0, fmt.Errorf("%w: %s", ErrSPIIndexZero, text)
	}
	return s, nil
}

// ParseEnclaveID parses a decimal enclave id from 1 to 65535.
func ParseEnclaveID(text string) (EnclaveID, error) {
	n, err := strconv.ParseUint(strings.TrimSpace(text), 10, 16)
	if err != nil {
		return 0, fmt.Errorf("%w: enclave id %q must be a decimal number from 1 to 65535", ErrSyntax, echo.Cut(text))
	}
	if n == 0 {
		return 0, ErrEnclaveZero
	}
	return EnclaveID(n), nil
}

// ParseServerID parses a decimal server id from 0 to 4294967295.
func ParseServerID(text string) (ServerID, error) {
	n, err := strconv.ParseUint(strings.TrimSpace(text), 10, 32)
	if err != nil {
		return 0, fmt.Errorf("%w: server id %q must be a decimal number from 0 to 4294967295", ErrSyntax, echo.Cut(text))
	}
	return ServerID(n), nil
}

// ParseGeneration parses a decimal generation from 0 to 4294967295.
func ParseGeneration(text string) (Generation, error) {
	n, err := strconv.ParseUint(strings.TrimSpace(text), 10, 32)
	if err != nil {
		return 0, fmt.Errorf("%w: generation %q must be a decimal number from 0 to 4294967295", ErrSyntax, echo.Cut(text))
	}
	return Generation(n), nil
}

// Version is the PSP version of an SA, which fixes its cipher.
type Version uint8

// The PSP versions Enclave uses.
const (
	// PSPv0 is AES-128-GCM; its SA key is 128 bits, derived with label "Pv0".
	PSPv0 Version = 0
	// PSPv1 is AES-256-GCM; its SA key is 256 bits, derived with label "Pv1".
	PSPv1 Version = 1
)

// Valid reports whether v is PSPv0 or PSPv1.
func (v Version) Valid() bool { return v == PSPv0 || v == PSPv1 }

// KeySize is the SA key length of v in bytes (0 for an invalid version).
func (v Version) KeySize() int {
	switch v {
	case PSPv0:
		return 16
	case PSPv1:
		return 32
	}
	return 0
}

// ParseVersion parses "0" or "1".
func ParseVersion(text string) (Version, error) {
	switch strings.TrimSpace(text) {
	case "0":
		return PSPv0, nil
	case "1":
		return PSPv1, nil
	}
	return 0, fmt.Errorf("%w: %q", ErrVersion, echo.Cut(text))
}

// VC is the derivation information every data packet carries in the clear
// (DESIGN §4): the server's enclave i, the peer's enclave j and the server
// id k. With it and the SPI, any holder of EK(i,j,g) or SK(i,j,k,g) derives
// the packet's key.
type VC struct {
	Enclave EnclaveID // i: the server's own enclave
	Peer    EnclaveID // j: the peer's enclave
	Server  ServerID  // k: the server
}

// String is the VC as logs, flow logs and captures show it: "i,j,k".
func (v VC) String() string {
	return strconv.Itoa(int(v.Enclave)) + "," + strconv.Itoa(int(v.Peer)) + "," + strconv.FormatUint(uint64(v.Server), 10)
}

// Level is a level of the key hierarchy.
type Level uint8

// The levels, from the root down.
const (
	LevelOrg    Level = iota + 1 // the org key OK
	LevelPair                    // an enclave-pair key EK(i,j,g)
	LevelServer                  // a server key SK(i,j,k,g)
	LevelSA                      // an SA key CK(spi)
)

// String names the level as the CLI and JSON output do.
func (l Level) String() string {
	switch l {
	case LevelOrg:
		return "org"
	case LevelPair:
		return "pair"
	case LevelServer:
		return "server"
	case LevelSA:
		return "sa"
	}
	return "Level(" + strconv.Itoa(int(l)) + ")"
}
