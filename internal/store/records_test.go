package store

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/registry"
)

// fixtureKEK is the KEK testdata/registry-v1.db was written under.
func fixtureKEK(t *testing.T) *KEK {
	raw := make([]byte, 32)
	for i := range raw {
		raw[i] = byte(i + 1)
	}
	k, err := NewKEK(raw)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// TestMigrateV1Store: a store written before issue 36 (the whole registry
// as one record: testdata/registry-v1.db, made by testdata/registry-v1.go.txt
// with commit aa1e1f9's code) opens with every record of its registry,
// as records; its old record is gone, the next change writes only what
// it touches, and a second open reads the same registry.
func TestMigrateV1Store(t *testing.T) {
	path := filepath.Join(t.TempDir(), "ks.db")
	raw, err := os.ReadFile("testdata/registry-v1.db")
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(path, raw, 0o600)
	s, err := OpenBolt(path, fixtureKEK(t))
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	st, _ := s.View(ctx)
	check := func(st *registry.State) {
		t.Helper()
		if len(st.Enclaves) != 2 || st.Devices.Len() != 9 || st.Tokens.Len() != 1 || st.SPILeases.Len() != 1 || len(st.Grants) != 1 || st.LastChange == "" {
			t.Fatalf("migrated registry: %d enclaves, %d devices, %d tokens, %d leases, %d grants, last change %q",
				len(st.Enclaves), st.Devices.Len(), st.Tokens.Len(), st.SPILeases.Len(), len(st.Grants), st.LastChange)
		}
		if d, ok := st.Device("laptop5"); !ok || !d.Revoked {
			t.Fatalf("laptop5: %+v", d)
		}
		if d, _ := st.Device("laptop1"); d.Overlay != "100.64.7.1/10" {
			t.Fatalf("laptop1's overlay: %q", d.Overlay)
		}
		if st.LeasedSPIs(3, 7, 1, 1) != 1000 {
			t.Fatalf("lease: %d", st.LeasedSPIs(3, 7, 1, 1))
		}
	}
	check(st)
	// The token's address is held: the next client gets the one after.
	_, err = s.Update(ctx, func(st *registry.State) error {
		return st.AddDevice(registry.Device{Name: "laptop7", Role: ca.RoleClient, Enclave: 7})
	})
	if err != nil {
		t.Fatal(err)
	}
	st, _ = s.View(ctx)
	if d, _ := st.Device("laptop7"); d.Overlay != "100.64.7.7/10" {
		t.Fatalf("laptop7's overlay: %q (laptop6's token holds .6)", d.Overlay)
	}
	s.Close()
	db, err := bolt.Open(path, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	db.View(func(tx *bolt.Tx) error {
		if tx.Bucket(bucketRegistry).Get(keyState) != nil {
			t.Error("the old registry record is still there")
		}
		if n := tx.Bucket(bucketRecords).Stats().KeyN; n != 1+1+10+1+1 {
			t.Errorf("%d records, want policy, root, 10 devices, a token, a lease", n)
		}
		return nil
	})
	db.Close()
	s, err = OpenBolt(path, fixtureKEK(t))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	st, _ = s.View(ctx)
	if st.Devices.Len() != 10 {
		t.Fatalf("after reopening: %d devices", st.Devices.Len())
	}
}

// TestRecordsTampered: a record deleted, one put back from an older copy
// of the store, or one moved under another key, stops the next open; so
// does a root that lost its MAC.
func TestRecordsTampered(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "ks.db")
	k := kek(t, 1)
	s, err := OpenBolt(path, k)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	add := func(name string) {
		t.Helper()
		if _, err := s.Update(ctx, func(st *registry.State) error {
			return st.AddDevice(registry.Device{Name: name, Role: ca.RoleGateway})
		}); err != nil {
			t.Fatal(err)
		}
	}
	add("gw1")
	add("gw2")
	s.Update(ctx, func(st *registry.State) error { _, err := st.RevokeDevice("gw1", time.Now()); return err })
	s.Close()
	good, _ := os.ReadFile(path)
	edit := func(name string, f func(b *bolt.Bucket) error) {
		t.Helper()
		os.WriteFile(path, good, 0o600)
		db, err := bolt.Open(path, 0o600, nil)
		if err != nil {
			t.Fatal(err)
		}
		if err := db.Update(func(tx *bolt.Tx) error { return f(tx.Bucket(bucketRecords)) }); err != nil {
			t.Fatal(err)
		}
		db.Close()
		if _, err := OpenBolt(path, k); !errors.Is(err, ErrTampered) {
			t.Errorf("%s: %v, want ErrTampered", name, err)
		}
	}
	gw1 := recordKey(kindDevice, "gw1")
	edit("a record deleted", func(b *bolt.Bucket) error { return b.Delete(gw1) })
	edit("a record moved", func(b *bolt.Bucket) error {
		v := bytes.Clone(b.Get(gw1))
		return b.Put(recordKey(kindDevice, "gw3"), v)
	})
	edit("a record swapped", func(b *bolt.Bucket) error {
		v1, v2 := bytes.Clone(b.Get(gw1)), bytes.Clone(b.Get(recordKey(kindDevice, "gw2")))
		b.Put(gw1, v2)
		return b.Put(recordKey(kindDevice, "gw2"), v1)
	})
	edit("the root's MAC", func(b *bolt.Bucket) error {
		return b.Put(keyRoot, bytes.Replace(bytes.Clone(b.Get(keyRoot)), []byte(`"mac":"`), []byte(`"mac":"00`), 1))
	})
	// The untouched copy opens.
	os.WriteFile(path, good, 0o600)
	s, err = OpenBolt(path, k)
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
}

// TestRecordsRollbackOne: one record put back from an older copy of the
// store (a revoked device's record from before its revocation) is found.
func TestRecordsRollbackOne(t *testing.T) {
	path, k, s := storeWithGateway(t)
	ctx := context.Background()
	var before []byte
	s.db.View(func(tx *bolt.Tx) error {
		before = bytes.Clone(tx.Bucket(bucketRecords).Get(recordKey(kindDevice, "gw")))
		return nil
	})
	s.Update(ctx, func(st *registry.State) error { _, err := st.RevokeDevice("gw", time.Now()); return err })
	s.Close()
	db, _ := bolt.Open(path, 0o600, nil)
	db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bucketRecords).Put(recordKey(kindDevice, "gw"), before) })
	db.Close()
	if _, err := OpenBolt(path, k); !errors.Is(err, ErrTampered) {
		t.Fatalf("a record rolled back: %v, want ErrTampered", err)
	}
}

// TestUpdateWritesWhatItTouches: a change to a registry of many devices
// writes the records it touched (and the root), not the registry; a
// failed change writes nothing; forks never see each other's changes.
func TestUpdateWritesWhatItTouches(t *testing.T) {
	path := filepath.Join(t.TempDir(), "ks.db")
	s, err := OpenBolt(path, kek(t, 1))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ctx := context.Background()
	s.Update(ctx, func(st *registry.State) error { return st.AddEnclave(3, "web") })
	_, err = s.Update(ctx, func(st *registry.State) error {
		for i := range 2000 {
			k := keys.ServerID(i + 1)
			if err := st.AddDevice(registry.Device{Name: fmt.Sprintf("web%04d", i), Role: ca.RoleServer, Enclave: 3, ServerID: &k}); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	before, _ := s.View(ctx)
	var written int
	st := before.Fork()
	k := keys.ServerID(5000)
	if err := st.AddDevice(registry.Device{Name: "new", Role: ca.RoleServer, Enclave: 3, ServerID: &k}); err != nil {
		t.Fatal(err)
	}
	ws, _, err := recordWrites(st, s.policy, false)
	if err != nil {
		t.Fatal(err)
	}
	written = len(ws)
	if written != 1 {
		t.Fatalf("adding one device writes %d records, want 1", written)
	}
	if _, ok := before.Device("new"); ok || before.Devices.Len() != 2000 {
		t.Fatal("a fork's change reached the registry it was forked from")
	}
	// A failed change commits nothing.
	boom := errors.New("boom")
	if _, err := s.Update(ctx, func(st *registry.State) error {
		st.AddDevice(registry.Device{Name: "half", Role: ca.RoleGateway})
		return boom
	}); !errors.Is(err, boom) {
		t.Fatal(err)
	}
	after, _ := s.View(ctx)
	if _, ok := after.Device("half"); ok || after != before {
		t.Fatal("a failed change left something behind")
	}
	// A duplicate server id is still refused, from the index.
	if _, err := s.Update(ctx, func(st *registry.State) error {
		k := keys.ServerID(7)
		return st.AddDevice(registry.Device{Name: "dup", Role: ca.RoleServer, Enclave: 3, ServerID: &k})
	}); !errors.Is(err, registry.ErrExists) {
		t.Fatalf("duplicate server id: %v", err)
	}
}

// TestUpdateTakesOldMACFromMemory: the MAC of a record a change replaces
// is the one the store wrote, not whatever bytes the file holds there now
// (an attacker with the file could set them so that the sum comes out
// right for an older record put back later): a change over a record
// whose bytes were edited meanwhile leaves a store that opens, with the
// change.
func TestUpdateTakesOldMACFromMemory(t *testing.T) {
	path, k, s := storeWithGateway(t)
	ctx := context.Background()
	// The record's MAC bytes edited under the running store.
	s.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketRecords)
		v := bytes.Clone(b.Get(recordKey(kindDevice, "gw")))
		for i := range 32 {
			v[i] ^= 0xff
		}
		return b.Put(recordKey(kindDevice, "gw"), v)
	})
	if _, err := s.Update(ctx, func(st *registry.State) error { _, err := st.RevokeDevice("gw", time.Now()); return err }); err != nil {
		t.Fatal(err)
	}
	s.Close()
	s, err := OpenBolt(path, k)
	if err != nil {
		t.Fatalf("the store after a change over an edited record: %v", err)
	}
	defer s.Close()
	st, _ := s.View(ctx)
	if d, _ := st.Device("gw"); !d.Revoked {
		t.Fatal("the change was lost")
	}
}

// storeWithGateway opens a new bbolt store holding one device, gw.
func storeWithGateway(t *testing.T) (string, *KEK, *Bolt) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "ks.db")
	k := kek(t, 1)
	s, err := OpenBolt(path, k)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Update(context.Background(), func(st *registry.State) error {
		return st.AddDevice(registry.Device{Name: "gw", Role: ca.RoleGateway})
	}); err != nil {
		t.Fatal(err)
	}
	return path, k, s
}
