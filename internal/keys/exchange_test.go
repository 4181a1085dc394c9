package keys

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/hpke"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"testing"
)

type party struct {
	id   ExchangeIdentity
	peer ExchangePeer // how others see this party
}

func newEd25519Party(t testing.TB, e EnclaveID) party {
	t.Helper()
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return party{ExchangeIdentity{e, priv}, ExchangePeer{e, pub}}
}

func newECDSAParty(t testing.TB, e EnclaveID) party {
	t.Helper()
	priv, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return party{ExchangeIdentity{e, priv}, ExchangePeer{e, &priv.PublicKey}}
}

// run does a whole exchange started by a, answered by b.
func run(t *testing.T, a, b party, g Generation) (Key, Key) {
	t.Helper()
	pending, offer, err := StartExchange(a.id, b.peer, g)
	if err != nil {
		t.Fatal(err)
	}
	answer, ekB, err := AnswerExchange(b.id, a.peer, g, offer)
	if err != nil {
		t.Fatal(err)
	}
	ekA, err := pending.Finish(answer)
	if err != nil {
		t.Fatal(err)
	}
	return ekA, ekB
}

// TestExchangeAgrees: both ends reach the same EK whichever side starts,
// with Ed25519 and ECDSA identities; every run and generation gives a new key.
func TestExchangeAgrees(t *testing.T) {
	a, b := newEd25519Party(t, 3), newECDSAParty(t, 7)
	seen := map[Key]bool{}
	for g := Generation(1); g <= 3; g++ {
		for _, order := range [][2]party{{a, b}, {b, a}} {
			x, y := run(t, order[0], order[1], g)
			if !x.Equal(&y) {
				t.Fatalf("generation %d, %d starting: the two ends disagree", g, order[0].id.Enclave)
			}
			if seen[x] {
				t.Fatal("an exchange repeated an earlier key")
			}
			seen[x] = true
		}
	}
}

// TestExchangeOutsiders: an eavesdropper holding every message, and a third
// enclave with a valid identity of its own, do not get the key; a third
// party cannot stand in for either side.
func TestExchangeOutsiders(t *testing.T) {
	a, b, c := newEd25519Party(t, 3), newEd25519Party(t, 7), newEd25519Party(t, 9)
	const g = 5
	pending, offer, err := StartExchange(a.id, b.peer, g)
	if err != nil {
		t.Fatal(err)
	}
	answer, ek, err := AnswerExchange(b.id, a.peer, g, offer)
	if err != nil {
		t.Fatal(err)
	}
	// The eavesdropper: its own KEM key cannot open B's encapsulation into
	// the same secret, and no public value of the transcript is the root.
	fields, _, err := parseExchange(answer, msgAnswer, 7, 3, g, 1)
	if err != nil {
		t.Fatal(err)
	}
	kem, kdf, aead := exchangeSuite()
	evil, _ := kem.GenerateKey()
	offerHash := sha256.Sum256(offer)
	if r, err := hpke.NewRecipient(fields[0], evil, kdf, aead, hpkeInfo(offerHash[:])); err == nil {
		s, _ := r.Export(exporterContext, KeySize)
		guess, _ := exchangedPairKey(s, 3, 7, g)
		if guess.Equal(&ek) {
			t.Fatal("an outside KEM key recovered the pair key")
		}
	}
	for _, public := range [][]byte{offer[:32], answer[:32], offer[len(offer)-32:], answer[len(answer)-32:]} {
		root, _ := KeyFromBytes(public)
		guess, _ := PairKey(&root, 3, 7, g)
		if guess.Equal(&ek) {
			t.Fatal("the pair key is derivable from public transcript bytes")
		}
	}
	// C answers A's offer in B's name: A refuses.
	forged, _, err := AnswerExchange(ExchangeIdentity{7, c.id.Signer}, a.peer, g, offer)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := pending.Finish(forged); !errors.Is(err, ErrExchangeAuth) {
		t.Fatalf("answer signed by a third party: %v, want ErrExchangeAuth", err)
	}
	// C offers to B in A's name: B refuses.
	_, cOffer, err := StartExchange(ExchangeIdentity{3, c.id.Signer}, b.peer, g)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := AnswerExchange(b.id, a.peer, g, cOffer); !errors.Is(err, ErrExchangeAuth) {
		t.Fatalf("offer signed by a third party: %v, want ErrExchangeAuth", err)
	}
	// C, with its own identity, asks B for the 3-7 key: the header names
	// the wrong pair for what B expects from A.
	_, cOwn, _ := StartExchange(c.id, b.peer, g)
	if _, _, err := AnswerExchange(b.id, a.peer, g, cOwn); !errors.Is(err, ErrExchangeMismatch) {
		t.Fatalf("offer from enclave 9 as 3: %v, want ErrExchangeMismatch", err)
	}
}

// TestExchangeTampering: every single-byte change to an offer or answer is
// refused, as are replays into another generation and a second Finish.
func TestExchangeTampering(t *testing.T) {
	a, b := newEd25519Party(t, 3), newEd25519Party(t, 7)
	const g = 2
	_, offer, err := StartExchange(a.id, b.peer, g)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < len(offer); i += 7 {
		bad := append([]byte(nil), offer...)
		bad[i] ^= 0x01
		if _, _, err := AnswerExchange(b.id, a.peer, g, bad); err == nil {
			t.Fatalf("offer with byte %d changed was accepted", i)
		}
	}
	if _, _, err := AnswerExchange(b.id, a.peer, g+1, offer); !errors.Is(err, ErrExchangeMismatch) {
		t.Fatalf("offer replayed into generation %d: %v", g+1, err)
	}
	for i := 0; i < 1300; i += 11 {
		pending, offer, _ := StartExchange(a.id, b.peer, g)
		answer, _, err := AnswerExchange(b.id, a.peer, g, offer)
		if err != nil {
			t.Fatal(err)
		}
		if i >= len(answer) {
			break
		}
		answer[i] ^= 0x80
		if _, err := pending.Finish(answer); err == nil {
			t.Fatalf("answer with byte %d changed was accepted", i)
		}
		if _, err := pending.Finish(answer); !errors.Is(err, ErrExchangeUsed) {
			t.Fatalf("second Finish: %v, want ErrExchangeUsed", err)
		}
	}
	// An answer to another offer does not finish this one.
	p1, _, _ := StartExchange(a.id, b.peer, g)
	_, offer2, _ := StartExchange(a.id, b.peer, g)
	answer2, _, _ := AnswerExchange(b.id, a.peer, g, offer2)
	if _, err := p1.Finish(answer2); !errors.Is(err, ErrExchangeAuth) {
		t.Fatalf("answer to another offer: %v, want ErrExchangeAuth", err)
	}
}

func TestExchangeConfig(t *testing.T) {
	a, b := newEd25519Party(t, 3), newEd25519Party(t, 3)
	if _, _, err := StartExchange(a.id, b.peer, 1); !errors.Is(err, ErrExchangeConfig) {
		t.Errorf("same enclave: %v", err)
	}
	if _, _, err := StartExchange(ExchangeIdentity{0, a.id.Signer}, ExchangePeer{7, b.peer.PublicKey}, 1); !errors.Is(err, ErrExchangeConfig) {
		t.Errorf("enclave 0: %v", err)
	}
	if _, _, err := StartExchange(ExchangeIdentity{3, nil}, ExchangePeer{7, b.peer.PublicKey}, 1); !errors.Is(err, ErrExchangeConfig) {
		t.Errorf("no signer: %v", err)
	}
	if _, _, err := AnswerExchange(ExchangeIdentity{7, b.id.Signer}, ExchangePeer{3, "not a key"}, 1, nil); !errors.Is(err, ErrExchangeMalformed) && !errors.Is(err, ErrExchangeConfig) {
		t.Errorf("bad peer key: %v", err)
	}
}

// TestEnclaveKeyMode: EK(i,i,g) from an enclave key E_i is the org formula
// with E_i as root, so servers inside one enclave need no exchange.
func TestEnclaveKeyMode(t *testing.T) {
	var ei Key
	for i := range ei {
		ei[i] = byte(i)
	}
	ek, err := PairKey(&ei, 3, 3, 1)
	if err != nil {
		t.Fatal(err)
	}
	d, _ := NewDeriver(ei[:], Scope{Level: LevelOrg, Generation: 1, HasGeneration: true})
	var ck1, ck2 SAKey
	if err := d.SAKey(&ck1, VC{3, 3, 10}, 0x80000001, PSPv1); err != nil {
		t.Fatal(err)
	}
	sk, _ := ServerKey(&ek, VC{3, 3, 10})
	ck2, _ = SAKeyFromServer(&sk, 0x80000001, PSPv1)
	if !ck1.Equal(&ck2) {
		t.Fatal("EK(i,i) chain from E_i disagrees")
	}
}

// FuzzAnswerExchange: no message but A's real offer is answered. The seeds
// are small framings of an offer (header, length-prefixed fields), not a
// whole 1.2 kB offer: the fuzzer then spends its time on the framing, where
// parsing bugs live, instead of minimising a large input through
// coverage-instrumented ML-KEM and signature code. The real offer is checked
// on its own.
func FuzzAnswerExchange(f *testing.F) {
	a, b := newEd25519Party(f, 3), newEd25519Party(f, 7)
	_, offer, err := StartExchange(a.id, b.peer, 1)
	if err != nil {
		f.Fatal(err)
	}
	if _, _, err := AnswerExchange(b.id, a.peer, 1, offer); err != nil {
		f.Fatalf("the real offer: %v", err)
	}
	f.Add(offer[:20])
	f.Add([]byte("EKX1\x01\x00\x03\x00\x07\x00\x00\x00\x01\xff\xff"))
	f.Add([]byte("EKX1\x01\x00\x03\x00\x07\x00\x00\x00\x01\x00\x02ab\x00\x01s"))
	f.Fuzz(func(t *testing.T, msg []byte) {
		if _, _, err := AnswerExchange(b.id, a.peer, 1, msg); err == nil && string(msg) != string(offer) {
			t.Fatal("accepted an offer A never made")
		}
	})
}

// FuzzFinishExchange: no message but the peer's real answer finishes an
// exchange. The pending exchange is made once (an ML-KEM key pair is too
// dear to make per input: the fuzzer would spend its time there) and
// copied per input, since Finish may run once on each copy; the seeds are
// small framings, as for FuzzAnswerExchange.
func FuzzFinishExchange(f *testing.F) {
	a, b := newEd25519Party(f, 3), newEd25519Party(f, 7)
	pending, offer, err := StartExchange(a.id, b.peer, 1)
	if err != nil {
		f.Fatal(err)
	}
	answer, _, _ := AnswerExchange(b.id, a.peer, 1, offer)
	f.Add(answer[:13])
	f.Add([]byte("EKX1\x02\x00\x07\x00\x03\x00\x00\x00\x01"))
	f.Add([]byte("EKX1\x02\x00\x07\x00\x03\x00\x00\x00\x01\x00\x02ab\x00\x01s"))
	f.Fuzz(func(t *testing.T, msg []byte) {
		p := *pending
		if _, err := p.Finish(msg); err == nil && string(msg) != string(answer) {
			t.Fatal("finished with a message B never sent")
		}
	})
}
