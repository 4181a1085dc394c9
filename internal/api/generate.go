// Package api is the generated Go code of the key service's gRPC API
// (proto/enclave/v1/keyservice.proto). Regenerate it after changing the
// .proto with `go generate ./internal/api`, which needs protoc and the
// well-known types (Debian packages protobuf-compiler and libprotobuf-dev)
// and the pinned plugins:
//
//	go install google.golang.org/protobuf/cmd/protoc-gen-go@v1.36.12
//	go install google.golang.org/grpc/cmd/protoc-gen-go-grpc@v1.6.2
package api

//go:generate protoc -I ../../proto --go_out=. --go_opt=module=github.com/enclavekeys/enclave/internal/api --go-grpc_out=. --go-grpc_opt=module=github.com/enclavekeys/enclave/internal/api enclave/v1/keyservice.proto
