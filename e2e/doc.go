// Package e2e runs the enclave binary as a user would: real processes,
// real certificates, real sockets on loopback, a real bbolt store.
package e2e
