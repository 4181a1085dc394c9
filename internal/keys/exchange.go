package keys

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/hpke"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
)

// The enclave key exchange (DESIGN §3, the alternative to an org key): two
// enclave key servers i ≠ j agree on a fresh secret S per generation, and
// EK(i,j,g) = KDF(S, "enclave-pair", [min]16 || [max]16 || [g]32, 256), the
// same formula as under an org key (PairKey with S as root).
//
// It is one round trip. The initiator sends an offer holding a fresh
// ML-KEM-768+X25519 public key (HPKE KEM MLKEM768X25519), signed with its
// long-term key. The responder checks the signature against the key it
// knows for that peer, encapsulates to the offered key (HPKE base mode,
// export-only), and returns the encapsulation signed over the offer's hash.
// S is the HPKE exporter secret, bound to the offer. An eavesdropper sees
// only public keys and an encapsulation; a third party cannot sign as either
// side; both ends reach the same EK whichever of them starts.

// Errors of the enclave key exchange.
var (
	// ErrExchangeMalformed: an offer or answer does not parse.
	ErrExchangeMalformed = errors.New("keys: malformed key-exchange message")
	// ErrExchangeAuth: a signature does not verify under the peer's key.
	ErrExchangeAuth = errors.New("keys: key-exchange message not signed by the expected peer")
	// ErrExchangeMismatch: the message is for another pair, direction or
	// generation than expected.
	ErrExchangeMismatch = errors.New("keys: key-exchange message is for another pair or generation")
	// ErrExchangeConfig: the parties are misconfigured (same enclave,
	// enclave 0, or an unsupported key type).
	ErrExchangeConfig = errors.New("keys: invalid key-exchange parties")
	// ErrExchangeUsed: Finish was already called on this exchange.
	ErrExchangeUsed = errors.New("keys: key exchange already finished")
)

// ExchangeIdentity is the local side of an exchange: an enclave key
// server's enclave and long-term signing key (Ed25519 or ECDSA, as in its
// certificate).
type ExchangeIdentity struct {
	Enclave EnclaveID
	Signer  crypto.Signer
}

// ExchangePeer is the remote side: its enclave and the public key it must
// have signed with (ed25519.PublicKey or *ecdsa.PublicKey).
type ExchangePeer struct {
	Enclave   EnclaveID
	PublicKey crypto.PublicKey
}

const (
	exchangeMagic   = "EKX1"
	msgOffer        = 1
	msgAnswer       = 2
	offerContext    = "enclave key exchange v1 offer\x00"
	answerContext   = "enclave key exchange v1 answer\x00"
	hpkeInfoPrefix  = "enclave key exchange v1 hpke\x00"
	exporterContext = "enclave-pair secret"
	maxField        = 1 << 14 // longer than any key, encapsulation or signature used
)

func exchangeSuite() (hpke.KEM, hpke.KDF, hpke.AEAD) {
	return hpke.MLKEM768X25519(), hpke.HKDFSHA256(), hpke.ExportOnly()
}

// PendingExchange is an initiator's state between sending its offer and
// receiving the answer. It holds an ephemeral private key and is used once.
type PendingExchange struct {
	self   ExchangeIdentity
	peer   ExchangePeer
	gen    Generation
	offer  []byte
	secret hpke.PrivateKey
}

// StartExchange begins an exchange for generation g with peer and returns
// the offer to send.
func StartExchange(self ExchangeIdentity, peer ExchangePeer, g Generation) (*PendingExchange, []byte, error) {
	if err := checkParties(self, peer); err != nil {
		return nil, nil, err
	}
	kem, _, _ := exchangeSuite()
	sk, err := kem.GenerateKey()
	if err != nil {
		return nil, nil, fmt.Errorf("keys: key exchange: %w", err)
	}
	body := exchangeHeader(msgOffer, self.Enclave, peer.Enclave, g)
	body = appendField(body, sk.PublicKey().Bytes())
	sig, err := exchangeSign(self.Signer, offerContext, nil, body)
	if err != nil {
		return nil, nil, err
	}
	offer := appendField(body, sig)
	return &PendingExchange{self: self, peer: peer, gen: g, offer: offer, secret: sk}, bytes.Clone(offer), nil
}

// AnswerExchange checks an offer from peer for generation g, and returns the
// answer to send back and the pair key EK(i,j,g) both sides will hold.
func AnswerExchange(self ExchangeIdentity, peer ExchangePeer, g Generation, offer []byte) ([]byte, Key, error) {
	if err := checkParties(self, peer); err != nil {
		return nil, Key{}, err
	}
	fields, body, err := parseExchange(offer, msgOffer, peer.Enclave, self.Enclave, g, 1)
	if err != nil {
		return nil, Key{}, err
	}
	if err := exchangeVerify(peer.PublicKey, offerContext, nil, body, fields[1]); err != nil {
		return nil, Key{}, err
	}
	kem, kdf, aead := exchangeSuite()
	pk, err := kem.NewPublicKey(fields[0])
	if err != nil {
		return nil, Key{}, fmt.Errorf("%w: offered public key: %v", ErrExchangeMalformed, err)
	}
	h := sha256.Sum256(offer)
	enc, sender, err := hpke.NewSender(pk, kdf, aead, hpkeInfo(h[:]))
	if err != nil {
		return nil, Key{}, fmt.Errorf("keys: key exchange: %w", err)
	}
	s, err := sender.Export(exporterContext, KeySize)
	if err != nil {
		return nil, Key{}, fmt.Errorf("keys: key exchange: %w", err)
	}
	ek, err := exchangedPairKey(s, self.Enclave, peer.Enclave, g)
	if err != nil {
		return nil, Key{}, err
	}
	ans := exchangeHeader(msgAnswer, self.Enclave, peer.Enclave, g)
	ans = appendField(ans, enc)
	sig, err := exchangeSign(self.Signer, answerContext, h[:], ans)
	if err != nil {
		return nil, Key{}, err
	}
	return appendField(ans, sig), ek, nil
}

// Finish checks the peer's answer and returns EK(i,j,g). It may be called
// once; the ephemeral key is dropped whatever the outcome.
func (p *PendingExchange) Finish(answer []byte) (Key, error) {
	if p.secret == nil {
		return Key{}, ErrExchangeUsed
	}
	secret := p.secret
	p.secret = nil
	fields, body, err := parseExchange(answer, msgAnswer, p.peer.Enclave, p.self.Enclave, p.gen, 1)
	if err != nil {
		return Key{}, err
	}
	h := sha256.Sum256(p.offer)
	if err := exchangeVerify(p.peer.PublicKey, answerContext, h[:], body, fields[1]); err != nil {
		return Key{}, err
	}
	_, kdf, aead := exchangeSuite()
	r, err := hpke.NewRecipient(fields[0], secret, kdf, aead, hpkeInfo(h[:]))
	if err != nil {
		return Key{}, fmt.Errorf("%w: encapsulation: %v", ErrExchangeMalformed, err)
	}
	s, err := r.Export(exporterContext, KeySize)
	if err != nil {
		return Key{}, fmt.Errorf("keys: key exchange: %w", err)
	}
	return exchangedPairKey(s, p.self.Enclave, p.peer.Enclave, p.gen)
}

// exchangedPairKey is EK(i,j,g) = KDF(S, "enclave-pair", ...), wiping S.
func exchangedPairKey(s []byte, i, j EnclaveID, g Generation) (Key, error) {
	root, err := KeyFromBytes(s)
	clear(s)
	if err != nil {
		return Key{}, err
	}
	defer root.Zero()
	return PairKey(&root, i, j, g)
}

func checkParties(self ExchangeIdentity, peer ExchangePeer) error {
	switch {
	case self.Enclave == 0 || peer.Enclave == 0:
		return fmt.Errorf("%w: enclave 0", ErrExchangeConfig)
	case self.Enclave == peer.Enclave:
		return fmt.Errorf("%w: both sides are enclave %d; EK(i,i,g) comes from the enclave key E_i, not an exchange", ErrExchangeConfig, self.Enclave)
	case self.Signer == nil || peer.PublicKey == nil:
		return fmt.Errorf("%w: missing signing or peer key", ErrExchangeConfig)
	}
	return nil
}

// exchangeHeader is magic || type || from [2] || to [2] || g [4].
func exchangeHeader(typ byte, from, to EnclaveID, g Generation) []byte {
	b := make([]byte, 0, 4096)
	b = append(b, exchangeMagic...)
	b = append(b, typ)
	b = binary.BigEndian.AppendUint16(b, uint16(from))
	b = binary.BigEndian.AppendUint16(b, uint16(to))
	return binary.BigEndian.AppendUint32(b, uint32(g))
}

const exchangeHeaderLen = len(exchangeMagic) + 1 + 2 + 2 + 4

func appendField(b, f []byte) []byte {
	b = binary.BigEndian.AppendUint16(b, uint16(len(f)))
	return append(b, f...)
}

// parseExchange checks the header of msg against what is expected and
// splits it into n fields plus the trailing signature, returning the fields
// and the signed body (everything before the signature's length).
func parseExchange(msg []byte, typ byte, from, to EnclaveID, g Generation, n int) ([][]byte, []byte, error) {
	if len(msg) < exchangeHeaderLen || string(msg[:4]) != exchangeMagic || msg[4] != typ {
		return nil, nil, fmt.Errorf("%w: bad header", ErrExchangeMalformed)
	}
	gotFrom := EnclaveID(binary.BigEndian.Uint16(msg[5:]))
	gotTo := EnclaveID(binary.BigEndian.Uint16(msg[7:]))
	gotGen := Generation(binary.BigEndian.Uint32(msg[9:]))
	if gotFrom != from || gotTo != to || gotGen != g {
		return nil, nil, fmt.Errorf("%w: message is %d->%d generation %d, expected %d->%d generation %d",
			ErrExchangeMismatch, gotFrom, gotTo, gotGen, from, to, g)
	}
	rest := msg[exchangeHeaderLen:]
	fields := make([][]byte, 0, n+1)
	var bodyLen int
	for k := 0; k <= n; k++ {
		if k == n {
			bodyLen = len(msg) - len(rest)
		}
		if len(rest) < 2 {
			return nil, nil, fmt.Errorf("%w: truncated", ErrExchangeMalformed)
		}
		l := int(binary.BigEndian.Uint16(rest))
		if l > maxField || len(rest)-2 < l {
			return nil, nil, fmt.Errorf("%w: truncated field", ErrExchangeMalformed)
		}
		fields = append(fields, rest[2:2+l])
		rest = rest[2+l:]
	}
	if len(rest) != 0 {
		return nil, nil, fmt.Errorf("%w: %d trailing bytes", ErrExchangeMalformed, len(rest))
	}
	return fields, msg[:bodyLen], nil
}

// signedMessage is context || bound || body: each signature is bound to its
// message type and, for an answer, to the offer it answers.
func signedMessage(context string, bound, body []byte) []byte {
	m := make([]byte, 0, len(context)+len(bound)+len(body))
	return append(append(append(m, context...), bound...), body...)
}

func exchangeSign(s crypto.Signer, context string, bound, body []byte) ([]byte, error) {
	m := signedMessage(context, bound, body)
	var sig []byte
	var err error
	switch s.Public().(type) {
	case ed25519.PublicKey:
		sig, err = s.Sign(rand.Reader, m, crypto.Hash(0))
	case *ecdsa.PublicKey:
		d := sha256.Sum256(m)
		sig, err = s.Sign(rand.Reader, d[:], crypto.SHA256)
	default:
		return nil, fmt.Errorf("%w: signing key must be Ed25519 or ECDSA, not %T", ErrExchangeConfig, s.Public())
	}
	if err != nil {
		return nil, fmt.Errorf("keys: key exchange: signing: %w", err)
	}
	return sig, nil
}

func exchangeVerify(pub crypto.PublicKey, context string, bound, body, sig []byte) error {
	m := signedMessage(context, bound, body)
	ok := false
	switch pk := pub.(type) {
	case ed25519.PublicKey:
		ok = len(pk) == ed25519.PublicKeySize && ed25519.Verify(pk, m, sig)
	case *ecdsa.PublicKey:
		d := sha256.Sum256(m)
		ok = ecdsa.VerifyASN1(pk, d[:], sig)
	default:
		return fmt.Errorf("%w: peer key must be Ed25519 or ECDSA, not %T", ErrExchangeConfig, pub)
	}
	if !ok {
		return ErrExchangeAuth
	}
	return nil
}

// hpkeInfo binds the HPKE context to the offer it answers.
func hpkeInfo(offerHash []byte) []byte {
	return append([]byte(hpkeInfoPrefix), offerHash...)
}
