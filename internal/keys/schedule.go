package keys

// PairKey returns EK(i,j,g) = KDF(root, "enclave-pair", [min]16 || [max]16 ||
// [g]32, 256). root is the org key OK; in the enclave-key-exchange mode
// (DESIGN §3) it is the enclave key E_i for i = j, or the exchanged secret S
// for i ≠ j: the formula is the same. EK(i,j,g) = EK(j,i,g).
func PairKey(root *Key, i, j EnclaveID, g Generation) (Key, error) {
	var out Key
	var d Deriver
	defer d.Reset()
	if err := d.Init(root[:], Scope{Level: LevelOrg, Generation: g, HasGeneration: true}); err != nil {
		return out, err
	}
	err := d.PairKey(&out, i, j)
	return out, err
}

// ServerKey returns SK(i,j,k,g) = KDF(EK(i,j,g), "server", [i]16 || [j]16 ||
// [k]32, 256), where vc.Enclave = i is the server's own enclave and vc.Peer
// = j the peer's.
func ServerKey(ek *Key, vc VC) (Key, error) {
	var out Key
	var d Deriver
	defer d.Reset()
	if err := d.Init(ek[:], Scope{Level: LevelPair, Enclave: vc.Enclave, Peer: vc.Peer}); err != nil {
		return out, err
	}
	err := d.ServerKey(&out, vc)
	return out, err
}

// SAKeyFromServer returns CK(spi) = KDF(SK, "Pv1", [spi]32, 256) for PSPv1 or
// KDF(SK, "Pv0", [spi]32, 128) for PSPv0: PSP's own SA-key derivation with
// SK as the master key.
func SAKeyFromServer(sk *Key, spi SPI, v Version) (SAKey, error) {
	var out SAKey
	var d Deriver
	defer d.Reset()
	if err := d.Init(sk[:], Scope{Level: LevelServer}); err != nil {
		return out, err
	}
	err := d.SAKey(&out, VC{}, spi, v)
	return out, err
}
