// Package keys is the Enclave key schedule (DESIGN §3): the hierarchy
//
//	org key OK
//	  -> enclave-pair key EK(i,j,g) = KDF(OK, "enclave-pair", [min(i,j)]16 || [max(i,j)]16 || [g]32, 256)
//	    -> server key     SK(i,j,k,g) = KDF(EK, "server", [i]16 || [j]16 || [k]32, 256)
//	      -> SA key       CK(spi) = KDF(SK, "Pv1", [spi]32, 256) or KDF(SK, "Pv0", [spi]32, 128)
//
// with KDF the SP 800-108 counter-mode KDF over AES-256-CMAC (package kdf).
// The inputs below each key are public and travel in every packet (the VC
// and the SPI), so whoever holds a key at some level derives every SA key
// beneath it and nothing else.
//
// The one-off functions PairKey, ServerKey and SAKey suit control-plane use.
// A Deriver holds one prepared key and derives the SA key of a packet in one
// call without allocating, which is what the data plane does per packet.
//
// Key material never prints: Key and SAKey redact themselves in fmt, slog and
// encoding; Hex is the one explicit way to reveal them.
package keys
