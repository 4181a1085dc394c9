package cli

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"reflect"
	"strings"

	"github.com/spf13/pflag"
	"go.yaml.in/yaml/v3"

	"github.com/enclavekeys/enclave/internal/fileread"
)

// mergeConfigFile fills the settings of cfg, a pointer to a command's
// settings struct whose yaml keys are its flags' names, from the YAML file
// at path: every setting the file gives and the command line does not
// (flags win). An unknown key is bad input.
func mergeConfigFile(path string, cfg any, flags *pflag.FlagSet) error {
	raw, err := fileread.Bounded(path, fileread.MaxConfig)
	if err != nil {
		return fileError(fmt.Errorf("--config: %w", err))
	}
	dst := reflect.ValueOf(cfg).Elem()
	file := reflect.New(dst.Type())
	dec := yaml.NewDecoder(bytes.NewReader(raw))
	dec.KnownFields(true)
	if err := dec.Decode(file.Interface()); err != nil && !errors.Is(err, io.EOF) {
		return usagef("--config %s: %s", path, configError(err, dst.Type()))
	}
	for i := range dst.NumField() {
		name, _, _ := strings.Cut(dst.Type().Field(i).Tag.Get("yaml"), ",")
		v := file.Elem().Field(i)
		if name == "" || name == "-" || v.IsZero() || flags.Changed(name) {
			continue
		}
		dst.Field(i).Set(v)
	}
	return nil
}

// configError says what is wrong in a config file in the settings' words:
// the YAML decoder names Go types ("field lisen not found in type
// cli.agentConfig"), which mean nothing to an operator.
func configError(err error, ty reflect.Type) string {
	var te *yaml.TypeError
	if !errors.As(err, &te) {
		return err.Error()
	}
	var keys []string
	for i := range ty.NumField() {
		if name, _, _ := strings.Cut(ty.Field(i).Tag.Get("yaml"), ","); name != "" && name != "-" {
			keys = append(keys, name)
		}
	}
	var out []string
	for _, e := range te.Errors {
		line, rest, ok := strings.Cut(e, ": ")
		if !ok {
			line, rest = "", e
		}
		if f, _, found := strings.Cut(strings.TrimPrefix(rest, "field "), " not found in type "); found && strings.HasPrefix(rest, "field ") {
			rest = fmt.Sprintf("unknown setting %q (the settings are the flags' names: %s)", f, strings.Join(keys, ", "))
		} else if i := strings.Index(rest, " into "); i >= 0 {
			rest = rest[:i] + " (wrong type for this setting)"
		}
		if line != "" {
			rest = line + ": " + rest
		}
		out = append(out, rest)
	}
	return strings.Join(out, "; ")
}
