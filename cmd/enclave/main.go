// Command enclave is the single binary of Enclave: key schedule tools now,
// and the key service, agent and gateway as they are built.
package main

import (
	"os"

	"github.com/enclavekeys/enclave/internal/cli"
)

func main() {
	os.Exit(cli.Main(os.Args[1:], cli.Stdio()))
}
