package cli

import (
	"strconv"

	"github.com/enclavekeys/enclave/internal/keys"
)

// enclaveFlag is an enclave id flag: an integer from 1 to 65535, checked
// when it is parsed, so that every command takes ids the same way and says
// the same thing about a bad one. The zero value is "not given".
type enclaveFlag struct{ id keys.EnclaveID }

func (f *enclaveFlag) String() string {
	if f.id == 0 {
		return ""
	}
	return strconv.Itoa(int(f.id))
}

func (f *enclaveFlag) Set(s string) error {
	id, err := keys.ParseEnclaveID(s)
	if err != nil {
		return err
	}
	f.id = id
	return nil
}

func (f *enclaveFlag) Type() string { return "I" }

// serverIDFlag is a server id flag: an integer from 0 to 4294967295.
type serverIDFlag struct {
	id  keys.ServerID
	set bool
}

func (f *serverIDFlag) String() string {
	if !f.set {
		return ""
	}
	return strconv.FormatUint(uint64(f.id), 10)
}

func (f *serverIDFlag) Set(s string) error {
	id, err := keys.ParseServerID(s)
	if err != nil {
		return err
	}
	f.id, f.set = id, true
	return nil
}

func (f *serverIDFlag) Type() string { return "K" }
