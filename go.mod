module github.com/enclavekeys/enclave

go 1.26.0

require (
	github.com/google/gopacket v1.1.19
	github.com/spf13/cobra v1.10.2
	go.etcd.io/bbolt v1.5.0
	golang.org/x/sys v0.50.0
)

require (
	github.com/inconshreveable/mousetrap v1.1.0 // indirect
	github.com/spf13/pflag v1.0.10 // indirect
	golang.org/x/net v0.0.0-20190620200207-3b0461eec859 // indirect
)
