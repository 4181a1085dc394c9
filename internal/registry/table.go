package registry

import (
	"cmp"
	"encoding/json"
	"iter"

	"github.com/google/btree"
)

// keyed is a record with a key of its own (a device's name, a token's
// hash): what a Table orders and finds it by.
type keyed[K cmp.Ordered] interface {
	key() K
}

// Table holds the records of one kind that grow with the fleet (devices,
// join tokens, SPI leases, endpoints), ordered by key, in a B-tree copied
// on write: Fork is O(1), a change copies only the path to the record it
// touches, and the fork and the original never see each other's changes.
// It remembers which keys changed since it was forked, so that a store
// writes only those records. The zero value is an empty table; it encodes
// as a JSON array in key order, as the registry always stored its lists.
type Table[K cmp.Ordered, V keyed[K]] struct {
	t     *btree.BTreeG[entry[K, V]]
	dirty map[K]struct{}
}

// entry is a record under its key (searched by the key alone).
type entry[K cmp.Ordered, V any] struct {
	k K
	v V
}

// tableDegree keeps nodes of a few dozen records: a change copies about
// log(n) nodes of that size.
const tableDegree = 16

func lessByKey[K cmp.Ordered, V any](a, b entry[K, V]) bool { return a.k < b.k }

func (t *Table[K, V]) tree() *btree.BTreeG[entry[K, V]] {
	if t.t == nil {
		t.t = btree.NewG(tableDegree, lessByKey[K, V])
	}
	return t.t
}

// Len is the number of records.
func (t *Table[K, V]) Len() int {
	if t.t == nil {
		return 0
	}
	return t.t.Len()
}

// Get returns the record with key k.
func (t *Table[K, V]) Get(k K) (V, bool) {
	var zero V
	if t.t == nil {
		return zero, false
	}
	e, ok := t.t.Get(entry[K, V]{k: k})
	return e.v, ok
}

// Has reports whether a record with key k is there.
func (t *Table[K, V]) Has(k K) bool {
	_, ok := t.Get(k)
	return ok
}

// All yields the records in key order. The table must not change while
// it runs.
func (t *Table[K, V]) All() iter.Seq[V] {
	return func(yield func(V) bool) {
		if t.t == nil {
			return
		}
		t.t.Ascend(func(e entry[K, V]) bool { return yield(e.v) })
	}
}

// Entries yields the keys and records in key order.
func (t *Table[K, V]) Entries() iter.Seq2[K, V] {
	return func(yield func(K, V) bool) {
		if t.t == nil {
			return
		}
		t.t.Ascend(func(e entry[K, V]) bool { return yield(e.k, e.v) })
	}
}

// From yields the records whose key is k or after, in key order.
func (t *Table[K, V]) From(k K) iter.Seq[V] {
	return func(yield func(V) bool) {
		if t.t == nil {
			return
		}
		t.t.AscendGreaterOrEqual(entry[K, V]{k: k}, func(e entry[K, V]) bool { return yield(e.v) })
	}
}

// Slice is the records in key order, a copy.
func (t *Table[K, V]) Slice() []V {
	out := make([]V, 0, t.Len())
	for v := range t.All() {
		out = append(out, v)
	}
	return out
}

// Put adds v, or replaces the record with its key.
func (t *Table[K, V]) Put(v V) {
	k := v.key()
	t.tree().ReplaceOrInsert(entry[K, V]{k, v})
	t.touch(k)
}

// Delete removes the record with key k, and reports whether there was one.
func (t *Table[K, V]) Delete(k K) bool {
	if t.t == nil {
		return false
	}
	_, ok := t.t.Delete(entry[K, V]{k: k})
	if ok {
		t.touch(k)
	}
	return ok
}

func (t *Table[K, V]) touch(k K) {
	if t.dirty == nil {
		t.dirty = map[K]struct{}{}
	}
	t.dirty[k] = struct{}{}
}

// fork is a copy of t that changes apart from it, with nothing changed
// yet. Forks of one table are made one at a time (State.Fork's caller
// holds the store's write lock); t may be read meanwhile.
func (t *Table[K, V]) fork() Table[K, V] {
	if t.t == nil {
		return Table[K, V]{}
	}
	return Table[K, V]{t: t.t.Clone()}
}

// Changed yields the keys put or deleted since the table was forked (or
// made), in no order.
func (t *Table[K, V]) Changed() iter.Seq[K] {
	return func(yield func(K) bool) {
		for k := range t.dirty {
			if !yield(k) {
				return
			}
		}
	}
}

// EachChanged calls f with each key changed since the fork and its
// record's JSON (nil: deleted), for a store to write.
func (t *Table[K, V]) EachChanged(f func(k K, raw []byte) error) error {
	for k := range t.dirty {
		var raw []byte
		if v, ok := t.Get(k); ok {
			var err error
			if raw, err = json.Marshal(v); err != nil {
				return err
			}
		}
		if err := f(k, raw); err != nil {
			return err
		}
	}
	return nil
}

// EachRecord calls f with every key and its record's JSON, in key order.
func (t *Table[K, V]) EachRecord(f func(k K, raw []byte) error) error {
	for k, v := range t.Entries() {
		raw, err := json.Marshal(v)
		if err != nil {
			return err
		}
		if err := f(k, raw); err != nil {
			return err
		}
	}
	return nil
}

// MarshalJSON encodes the records as an array in key order.
func (t Table[K, V]) MarshalJSON() ([]byte, error) { return json.Marshal(t.Slice()) }

// UnmarshalJSON decodes an array of records (a later record replaces an
// earlier one of the same key).
func (t *Table[K, V]) UnmarshalJSON(raw []byte) error {
	var vs []V
	if err := json.Unmarshal(raw, &vs); err != nil {
		return err
	}
	*t = Table[K, V]{}
	for _, v := range vs {
		t.tree().ReplaceOrInsert(entry[K, V]{v.key(), v})
	}
	return nil
}

// TableOf makes a table of vs (tests and tools building a registry by
// hand).
func TableOf[K cmp.Ordered, V keyed[K]](vs ...V) Table[K, V] {
	var t Table[K, V]
	for _, v := range vs {
		t.tree().ReplaceOrInsert(entry[K, V]{v.key(), v})
	}
	return t
}
