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
		return usagef("--config %s: %w", path, err)
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
