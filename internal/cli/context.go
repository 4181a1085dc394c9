package cli

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/spf13/pflag"
)

// The admin context (issue 32): enclave admin and enclave map take the
// key service's address and the admin's credentials from their flags,
// else from ENCLAVE_KEYSERVER, ENCLAVE_CA, ENCLAVE_CERT, ENCLAVE_KEY (and
// ENCLAVE_SERVER_NAME), else from a small YAML file, $ENCLAVE_CONTEXT or
// ~/.config/enclave/admin.yaml, whose relative paths are from the file's
// directory:
//
//	keyserver: 192.0.2.10:7443
//	ca: ca/ca.crt
//	cert: certs/alice.crt
//	key: certs/alice.key

// adminContext is the file's settings.
type adminContext struct {
	Keyserver  string `yaml:"keyserver"`
	ServerName string `yaml:"server-name"`
	CA         string `yaml:"ca"`
	Cert       string `yaml:"cert"`
	Key        string `yaml:"key"`
}

// adminContextPath is the context file's path: $ENCLAVE_CONTEXT, else
// admin.yaml in the user's configuration directory.
func adminContextPath() string {
	if p := os.Getenv("ENCLAVE_CONTEXT"); p != "" {
		return p
	}
	dir, err := os.UserConfigDir()
	if err != nil {
		return filepath.Join("~", ".config", "enclave", "admin.yaml")
	}
	return filepath.Join(dir, "enclave", "admin.yaml")
}

// fromContext fills the settings no flag gave from the environment, then
// from the context file (when there is one).
func (c *connFlags) fromContext() error {
	fields := []struct {
		v   *string
		env string
	}{{&c.keyserver, "ENCLAVE_KEYSERVER"}, {&c.serverName, "ENCLAVE_SERVER_NAME"}, {&c.ca, "ENCLAVE_CA"}, {&c.cert, "ENCLAVE_CERT"}, {&c.key, "ENCLAVE_KEY"}}
	missing := false
	for _, f := range fields {
		if *f.v == "" {
			*f.v = os.Getenv(f.env)
		}
		missing = missing || *f.v == "" && f.env != "ENCLAVE_SERVER_NAME"
	}
	if !missing {
		return nil
	}
	path := adminContextPath()
	if _, err := os.Stat(path); err != nil {
		if errors.Is(err, fs.ErrNotExist) && os.Getenv("ENCLAVE_CONTEXT") == "" {
			return nil // no file: the flags say what is missing
		}
		return usagef("ENCLAVE_CONTEXT %s: %v", path, err)
	}
	var ac adminContext
	if err := mergeConfigFile(path, &ac, pflag.NewFlagSet("context", pflag.ContinueOnError)); err != nil {
		if errors.Is(err, fs.ErrNotExist) && os.Getenv("ENCLAVE_CONTEXT") == "" {
			return nil // no file: the flags say what is missing
		}
		return err
	}
	dir := filepath.Dir(path)
	rel := func(p string) string {
		if p == "" || filepath.IsAbs(p) {
			return p
		}
		return filepath.Join(dir, p)
	}
	for _, f := range []struct {
		v   *string
		val string
	}{{&c.keyserver, ac.Keyserver}, {&c.serverName, ac.ServerName}, {&c.ca, rel(ac.CA)}, {&c.cert, rel(ac.Cert)}, {&c.key, rel(ac.Key)}} {
		if *f.v == "" {
			*f.v = f.val
		}
	}
	return nil
}
