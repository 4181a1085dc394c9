package keys

import (
	"crypto/aes"
	"testing"
)

// BenchmarkAESBlock is the baseline of this package's benchmarks: one
// AES-256 block encryption through crypto/aes's cipher.Block, in the same
// run. Each block is encrypted in place, so it waits for the one before, as
// the blocks of a CMAC chain do: this is AES's latency.
func BenchmarkAESBlock(b *testing.B) {
	c, err := aes.NewCipher(make([]byte, 32))
	if err != nil {
		b.Fatal(err)
	}
	var blk [16]byte
	b.ReportAllocs()
	for b.Loop() {
		c.Encrypt(blk[:], blk[:])
	}
}

// BenchmarkAESBlockIndependent encrypts the same block into another buffer
// each time, so blocks overlap in the pipeline: AES's throughput, the
// stricter yardstick for derivations that run independent blocks.
func BenchmarkAESBlockIndependent(b *testing.B) {
	c, err := aes.NewCipher(make([]byte, 32))
	if err != nil {
		b.Fatal(err)
	}
	var src, dst [16]byte
	b.ReportAllocs()
	for b.Loop() {
		c.Encrypt(dst[:], src[:])
	}
}

// BenchmarkDerive measures each level of the schedule.
//
//	pair:   EK from a prepared org key
//	server: SK from a prepared EK
//	sa-v0:  a 128-bit SA key from a prepared SK
//	sa-v1:  a 256-bit SA key from a prepared SK
//	chain:  a 256-bit SA key from a prepared org key, in one call (EK, SK and
//	        CK with two AES key expansions on the way)
func BenchmarkDerive(b *testing.B) {
	ok := mustKey(b, vecOK)
	ek := mustKey(b, vecEK371)
	sk := mustKey(b, vecSK37258)
	vc := VC{3, 7, 258}
	org, _ := NewDeriver(ok[:], Scope{Level: LevelOrg, Generation: 1, HasGeneration: true})
	pair, _ := NewDeriver(ek[:], Scope{Level: LevelPair, Enclave: 3, Peer: 7})
	server, _ := NewDeriver(sk[:], Scope{Level: LevelServer, Enclave: 3, Peer: 7, Server: 258})
	var k Key
	var ck SAKey
	run := func(name string, f func() error) {
		b.Run(name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if err := f(); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
	run("pair", func() error { return org.PairKey(&k, 3, 7) })
	run("server", func() error { return pair.ServerKey(&k, vc) })
	run("sa-v0", func() error { return server.SAKey(&ck, vc, 0x80001234, PSPv0) })
	run("sa-v1", func() error { return server.SAKey(&ck, vc, 0x80001234, PSPv1) })
	run("chain", func() error { return org.SAKey(&ck, vc, 0x80001234, PSPv1) })
}
