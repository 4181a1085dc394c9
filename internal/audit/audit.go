// Package audit is the key service's tamper-evident log (DESIGN §6): JSON
// lines, each carrying the hash of the line before it, so that editing,
// removing or reordering any line breaks the chain at that point. It never
// holds key material: entries have no field for it.
package audit

import (
	"bufio"
	"bytes"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime"
	"sync"
	"syscall"
	"time"
)

// Decisions.
const (
	Allow = "allow"
	Deny  = "deny"
)

// IDs are the identifiers an entry is about.
type IDs struct {
	Enclave uint16   `json:"enclave,omitempty"`
	Peer    uint16   `json:"peer,omitempty"`
	Server  *uint32  `json:"server,omitempty"`
	Device  string   `json:"device,omitempty"`
	Pairs   []string `json:"pairs,omitempty"`
}

// Entry is one decision of the key service.
type Entry struct {
	Seq    uint64    `json:"seq"`
	Time   time.Time `json:"time"`
	Caller string    `json:"caller"` // the caller's identity (SPIFFE ID)
	Role   string    `json:"role"`
	RPC    string    `json:"rpc"`
	// Source is the address of a caller without a certificate (a host
	// joining): the host and, for IPv6, its /64 charged for refusals.
	Source     string  `json:"source,omitempty"`
	Level      string  `json:"level,omitempty"` // key level issued or asked for
	IDs        *IDs    `json:"ids,omitempty"`
	Generation *uint32 `json:"generation,omitempty"`
	Decision   string  `json:"decision"`
	Reason     string  `json:"reason,omitempty"`
	// Change names one attempt of one registry change: the entries it
	// wrote (the change, its rotations, its Sight) carry the same name, so
	// that a later entry can void them all (Voids).
	Change string `json:"change,omitempty"`
	// Sight is what a registry change does to one device's sight: the
	// pairs (IDs.Pairs) it gains or loses read access to, by which right.
	Sight *Sight `json:"sight,omitempty"`
	// Voids names changes whose entries stand in the log but that were
	// not committed (the store refused them, or a retry replaced them).
	Voids []string `json:"voids,omitempty"`
	// Opened is, in a summary of watch streams opened, who opened one
	// and when (the key service writes these a second at a time rather
	// than one synced entry per stream).
	Opened []string `json:"opened,omitempty"`
	// Follows is, on a change's own entry, the last change committed
	// before it, and on a key service's start, the last change committed:
	// the committed changes form a chain, and a change the chain leaves
	// out was not committed (a crash between its entries and its commit).
	Follows string `json:"follows,omitempty"`
	// Prev is the previous entry's Hash (64 zeros for the first); Hash is
	// SHA-256 over Prev and this entry's JSON without Hash.
	Prev string `json:"prev"`
	Hash string `json:"hash,omitempty"`
	// MAC is, in a keyed log, an HMAC of Hash under a key derived from the
	// KEK (Keyer): only a key service can write an entry that verifies,
	// where the plain chain lets anyone who can write the file extend it.
	MAC string `json:"mac,omitempty"`
}

// Keyer MACs a keyed log's hashes (the key service's store, under a key
// derived from its KEK).
type Keyer interface {
	ChainMAC(hash []byte) []byte
}

// Sight is one device's change of read access that a registry change made
// (the key service's visibility model, DESIGN §8).
type Sight struct {
	// Change is gains, loses or changes (the right by which it reads).
	Change string `json:"change"`
	Device string `json:"device"`
	Role   string `json:"role"`
	Right  string `json:"right"`
	// From is the right held before, for a change of right.
	From string `json:"from,omitempty"`
}

// genesis is the Prev of the first entry.
var genesis = hex.EncodeToString(make([]byte, sha256.Size))

// seal fills Hash (and, with k, MAC) from the other fields and returns
// the entry's line. The body is marshalled once: Hash and MAC are the
// last fields and omitted when empty, so the line is the body with
// ,"hash":"..." (and ,"mac":"...") before its closing brace, exactly what
// marshalling the entry with them would give. Without k, a MAC the entry
// carries is kept as it is (a verifier without the key checks the rest).
func (e *Entry) seal(k Keyer) ([]byte, error) {
	claimed := e.MAC
	e.Hash, e.MAC = "", ""
	body, err := json.Marshal(e)
	if err != nil {
		return nil, err
	}
	sum := sha256.Sum256(body)
	e.Hash = hex.EncodeToString(sum[:])
	e.MAC = claimed
	if k != nil {
		e.MAC = hex.EncodeToString(k.ChainMAC(sum[:]))
	}
	line := make([]byte, 0, len(body)+len(e.Hash)+len(e.MAC)+20)
	line = append(line, body[:len(body)-1]...)
	line = append(line, `,"hash":"`...)
	line = append(line, e.Hash...)
	if e.MAC != "" {
		line = append(line, `","mac":"`...)
		line = append(line, e.MAC...)
	}
	return append(line, `"}`...), nil
}

// Head is the end of a chain: the last entry's sequence number and hash.
type Head struct {
	Seq  uint64 `json:"seq"`
	Hash string `json:"hash"`
	// Clean marks the head a key service saved as it closed the log: an
	// entry found after it was added while no key service ran.
	Clean bool `json:"clean,omitempty"`
	// KeyedFrom is the first entry written with a MAC: every entry from it
	// on must carry one (stripping them all would otherwise leave a log
	// with no keyed part to check).
	KeyedFrom uint64 `json:"keyed_from,omitempty"`
}

// GenesisHead is the head of an empty log.
func GenesisHead() Head { return Head{Seq: 0, Hash: genesis} }

// Next makes e the entry after head at time now and returns its line
// (without newline) and the new head. Stores other than a file (etcd) use
// it to extend the same chain.
func Next(head Head, e Entry, now time.Time, k Keyer) ([]byte, Head, error) {
	if e.Decision != Allow && e.Decision != Deny {
		return nil, head, ErrDecision
	}
	e.Seq, e.Time, e.Prev, e.MAC = head.Seq+1, now.UTC(), head.Hash, ""
	line, err := e.seal(k)
	if err != nil {
		return nil, head, fmt.Errorf("audit: %w", err)
	}
	if len(line) > MaxLine {
		return nil, head, fmt.Errorf("%w: %d bytes, at most %d", ErrTooLong, len(line), MaxLine)
	}
	return line, Head{Seq: e.Seq, Hash: e.Hash}, nil
}

// Sink is where a key service writes its audit entries: a file Log or a
// cluster store. Append returns once the entry is durable.
type Sink interface {
	Append(Entry) error
	Close() error
}

// MaxLine is the longest line (without its newline) the writer writes and
// the verifier reads: both use this one constant, so that nothing the
// writer accepted can later fail to verify for its length.
const MaxLine = 16 << 10

// Errors of the log.
var (
	ErrDecision = errors.New("audit: decision must be allow or deny")
	ErrClosed   = errors.New("audit: log closed")
	// ErrTooLong: the entry's line would exceed MaxLine. Nothing is
	// written, and the log stays open.
	ErrTooLong = errors.New("audit: entry too long for one line")
	// ErrLocked: another process has the log open for writing.
	ErrLocked = errors.New("audit: the log is in use by another process")
	// ErrAnchor: the log does not reach the head its anchor recorded.
	ErrAnchor = errors.New("audit: the log does not match its anchored head")
	// ErrPastClean: the log has entries after the head its key service
	// saved as it stopped cleanly: the store holding that head was
	// restored from an older copy, or entries were added while no key
	// service ran.
	ErrPastClean = errors.New("audit: the log goes on past the head saved at a clean stop")
	// ErrTornEnd: the log's last line has no newline: a write cut short,
	// or one in progress in a log being written while it is read.
	ErrTornEnd = errors.New("audit: the last line is incomplete")
)

// Anchor keeps the head of the durable log outside it (the key service
// keeps it in its store, under a MAC of the KEK). The chain alone shows an
// edit in the middle; the anchor also shows lines cut from the end, an
// emptied log, and a log rewritten and re-hashed from some line on.
type Anchor interface {
	// LoadHead returns the head last saved; ok is false if none was.
	LoadHead() (h Head, ok bool, err error)
	// SaveHead records h durably before it returns.
	SaveHead(h Head) error
}

// Log appends entries to a file. An Append returns only after its entry
// is written and synced, so an acknowledged entry survives a crash;
// concurrent Appends share one fsync (group commit), so the log keeps up
// with a busy key service. Safe for concurrent use.
type Log struct {
	mu      sync.Mutex
	cond    *sync.Cond // signals a finished sync
	f       *os.File
	seq     uint64 // last entry written
	synced  uint64 // last entry known durable
	syncing bool
	failed  error // a failed write or sync poisons the log: fail closed
	prev    string
	// off is the file's length with every entry written; syncedOff and
	// syncedHash are its length and last hash as of the last sync, where
	// a log that failed (a full or read-only disk) goes back to when it
	// recovers. tried is the last recovery attempt.
	off, syncedOff int64
	syncedHash     string
	tried          time.Time
	// keyer MACs every entry (the anchor's, when it is a Keyer); last is
	// the newest entry's time: entries are never dated before it.
	keyer     Keyer
	last      time.Time
	keyedFrom uint64 // the first keyed entry's sequence number (0: none yet)
	now       func() time.Time
	torn      int // bytes of a torn final line dropped by Open
	// The anchor is saved by its own goroutine (saveAnchors), after the
	// entries it covers are synced: an Append never waits for it, so an
	// owner may append while it holds its store's write lock.
	anchor     Anchor
	anchorHead Head          // the latest synced head, to be saved
	anchorReq  chan struct{} // a new head is waiting
	anchorStop chan struct{} // closed by Close: save the last head now
	anchorDone chan struct{} // closed when saveAnchors has saved the last one
}

// AnchorEvery is the least time between two anchor saves: each save is a
// synced write to the store, and saving after every group of appends would
// double the syncs of a busy key server. Entries acknowledged within this
// long before a crash may lie past the anchor.
const AnchorEvery = 100 * time.Millisecond

// dropTorn truncates a final line that has no newline (a write cut short by
// a crash, never acknowledged) and returns its length. It reads only the
// file's tail: a line is at most MaxLine bytes and its newline, so a
// longer unterminated tail is not a torn line but damage, and is refused.
func dropTorn(f *os.File) (int, error) {
	st, err := f.Stat()
	if err != nil {
		return 0, err
	}
	size := st.Size()
	n := min(size, MaxLine+1)
	if n == 0 {
		return 0, nil
	}
	tail := make([]byte, n)
	if _, err := f.ReadAt(tail, size-n); err != nil {
		return 0, err
	}
	if tail[n-1] == '\n' {
		return 0, nil
	}
	i := bytes.LastIndexByte(tail, '\n')
	if i < 0 && size > n {
		return 0, fmt.Errorf("the last %d bytes hold no line end: not a torn write but damage, refusing to cut it", n)
	}
	keep := size - n + int64(i+1)
	if err := f.Truncate(keep); err != nil {
		return 0, fmt.Errorf("dropping a torn final line: %w", err)
	}
	return int(size - keep), nil
}

// TornBytes is the length of the torn final line Open dropped (0 if none):
// a write cut short by a crash. The owner should say so in the log.
func (l *Log) TornBytes() int { return l.torn }

// Open opens (or creates, mode 0600) the log at path and continues its
// chain. A final line cut short by a crash (no newline: never acknowledged)
// is removed; anything else that does not verify is an error, so a damaged
// log is never extended as if it were sound. With an anchor, the log must
// also reach the anchored head (a non-empty log needs one), and every
// group of appends saves the new head to it before it is acknowledged.
func Open(path string, now func() time.Time, anchor Anchor) (*Log, error) {
	return open(path, now, anchor, false, nil)
}

// OpenEach is Open (or, restored, OpenRestored) that gives each every
// entry of the log as it verifies it: a caller that needs the log's
// history (the key server's Reconcile) reads it in the same pass.
func OpenEach(path string, now func() time.Time, anchor Anchor, restored bool, each func(Entry)) (*Log, error) {
	return open(path, now, anchor, restored, each)
}

// OpenRestored is Open for a log whose store was restored from an older
// copy (the operator says so): the store's anchor may be a clean stop's
// head from before entries the log holds. Everything else is checked as
// Open checks it (the chain, the MACs, the anchored entry itself).
func OpenRestored(path string, now func() time.Time, anchor Anchor) (*Log, error) {
	return open(path, now, anchor, true, nil)
}

func open(path string, now func() time.Time, anchor Anchor, restored bool, each func(Entry)) (*Log, error) {
	if now == nil {
		now = time.Now
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("audit: %w", err)
	}
	// One writer at a time: two key servers interleaving lines would break
	// the chain. The lock goes with the file descriptor, so a crashed
	// writer's lock goes with it.
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, fmt.Errorf("%w: %s", ErrLocked, path)
		}
		return nil, fmt.Errorf("audit: locking %s: %w", path, err)
	}
	torn, err := dropTorn(f)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("audit: %s: %w", path, err)
	}
	// The log is verified as a stream: memory does not grow with its size.
	verifyFrom := func(check func(io.Reader) (Result, error)) (Result, error) {
		if _, err := f.Seek(0, io.SeekStart); err != nil {
			return Result{}, err
		}
		return check(bufio.NewReaderSize(f, 64<<10))
	}
	keyer, _ := anchor.(Keyer)
	var last time.Time
	seen := func(e Entry) {
		last = e.Time
		if each != nil {
			each(e)
		}
	}
	// One pass: against the anchor where the store holds one (the log's
	// whole chain, its MACs and the anchored entry), else the chain and
	// MACs alone.
	var h Head
	var anchored bool
	if anchor != nil {
		h, anchored, err = anchor.LoadHead()
	}
	var res Result
	var keyedFrom uint64
	switch {
	case err != nil:
	case anchored:
		keyedFrom = h.KeyedFrom
		res, err = verifyFrom(func(r io.Reader) (Result, error) { return verifyAnchored(r, h, keyer, seen, restored) })
		if err == nil && h.Clean {
			// Open from here on: a crash after the next entries must not
			// look like entries added while stopped.
			h.Clean = false
			err = anchor.SaveHead(h)
		}
	default:
		res, err = verifyFrom(func(r io.Reader) (Result, error) { return VerifyKeyed(r, keyer, seen) })
		if err == nil && anchor != nil && res.Entries > 0 {
			err = fmt.Errorf("%w: the log has %d entries but no anchor was ever saved for it", ErrAnchor, res.Entries)
		}
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("audit: %s does not verify, refusing to extend it: %w", path, err)
	}
	if _, err := f.Seek(0, io.SeekEnd); err != nil {
		f.Close()
		return nil, err
	}
	size, err := f.Seek(0, io.SeekCurrent)
	if err != nil {
		f.Close()
		return nil, err
	}
	if keyer != nil && keyedFrom == 0 {
		// The anchor does not say yet where the keyed part begins: where
		// it does, or with the next entry.
		if keyedFrom = res.FirstKeyed; keyedFrom == 0 {
			keyedFrom = uint64(res.Entries) + 1
		}
	}
	l := &Log{f: f, seq: uint64(res.Entries), synced: uint64(res.Entries), prev: res.Head, now: now, torn: torn, anchor: anchor,
		off: size, syncedOff: size, syncedHash: res.Head, keyer: keyer, last: last, keyedFrom: keyedFrom}
	l.cond = sync.NewCond(&l.mu)
	if anchor != nil {
		l.anchorReq, l.anchorStop, l.anchorDone = make(chan struct{}, 1), make(chan struct{}), make(chan struct{})
		go l.saveAnchors()
	}
	return l, nil
}

// Append records e, setting its Seq, Time, Prev and Hash, and returns once
// it is durable.
func (l *Log) Append(e Entry) error {
	if e.Decision != Allow && e.Decision != Deny {
		return ErrDecision
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if err := l.healthyLocked(); err != nil {
		return err
	}
	e.Seq = l.seq + 1
	e.Time = l.now().UTC()
	if e.Time.Before(l.last) { // a clock stepped back: never date an entry before the last
		e.Time = l.last
	}
	e.Prev, e.MAC = l.prev, ""
	line, err := e.seal(l.keyer)
	if err != nil {
		return fmt.Errorf("audit: %w", err)
	}
	if len(line) > MaxLine {
		return fmt.Errorf("%w: %d bytes, at most %d", ErrTooLong, len(line), MaxLine)
	}
	line = append(line, '\n')
	if _, err := l.f.Write(line); err != nil {
		l.failed, l.tried = fmt.Errorf("audit: write failed, log closed to further entries until it can be written again: %w", err), time.Now()
		return l.failed
	}
	l.off += int64(len(line))
	l.seq, l.prev, l.last = e.Seq, e.Hash, e.Time
	mine := e.Seq
	for l.synced < mine {
		if l.failed != nil {
			return l.failed
		}
		if l.syncing {
			l.cond.Wait()
			continue
		}
		// Become the syncer for everything written so far.
		l.syncing = true
		target, targetHash, targetOff, f := l.seq, l.prev, l.off, l.f
		l.mu.Unlock()
		err := f.Sync()
		l.mu.Lock()
		l.syncing = false
		if err != nil {
			l.failed, l.tried = fmt.Errorf("audit: sync failed, log closed to further entries until it can be written again: %w", err), time.Now()
		} else if target > l.synced {
			l.synced, l.syncedOff, l.syncedHash = target, targetOff, targetHash
			if l.anchor != nil {
				l.anchorHead = Head{Seq: target, Hash: targetHash, KeyedFrom: l.keyedFrom}
				select {
				case l.anchorReq <- struct{}{}:
				default: // a request is pending; it will read the newest head
				}
			}
		}
		l.cond.Broadcast()
	}
	return nil
}

// recoverEvery is the least time between two attempts to write a failed
// log again.
const recoverEvery = time.Second

// recoverLocked tries to make a failed log writable again (the disk has
// room again, or is writable again): it cuts the file back to the last
// synced entry, whose writer was told of every later one's failure, and
// syncs that. It reports whether the log is sound again. Called with
// l.mu held, at most once per recoverEvery.
func (l *Log) recoverLocked() bool {
	if l.f == nil || l.syncing {
		return false
	}
	if now := time.Now(); now.Sub(l.tried) < recoverEvery {
		return false
	} else {
		l.tried = now
	}
	// Room for entries first: a disk still full would fail the next one.
	var fs syscall.Statfs_t
	if err := syscall.Fstatfs(int(l.f.Fd()), &fs); err == nil && uint64(fs.Bavail)*uint64(fs.Bsize) < 4*MaxLine {
		return false
	}
	if err := l.f.Truncate(l.syncedOff); err != nil {
		return false
	}
	if _, err := l.f.Seek(l.syncedOff, io.SeekStart); err != nil {
		return false
	}
	if err := l.f.Sync(); err != nil {
		return false
	}
	if l.anchor != nil {
		// The anchor may be what failed: it must hold before anything new
		// is acknowledged.
		if err := l.anchor.SaveHead(Head{Seq: l.synced, Hash: l.syncedHash, KeyedFrom: l.keyedFrom}); err != nil {
			return false
		}
	}
	l.seq, l.prev, l.off, l.failed = l.synced, l.syncedHash, l.syncedOff, nil
	return true
}

// Healthy reports why the log takes no entries now (nil: it does): a
// write, sync or anchor save failed and the disk has not taken the log
// back yet. It tries to recover, at most once a second, so that a
// readiness probe brings a log back as soon as its disk has room.
func (l *Log) Healthy() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.healthyLocked()
}

func (l *Log) healthyLocked() error {
	if l.f == nil {
		return ErrClosed
	}
	if l.failed != nil && !l.recoverLocked() {
		return l.failed
	}
	// A disk about to be full is said before a write fails on it.
	var fs syscall.Statfs_t
	if err := syscall.Fstatfs(int(l.f.Fd()), &fs); err == nil && uint64(fs.Bavail)*uint64(fs.Bsize) < 4*MaxLine {
		return fmt.Errorf("audit: the log's disk is full (%d bytes left)", uint64(fs.Bavail)*uint64(fs.Bsize))
	}
	return nil
}

// Close closes the file, after the anchor (if any) holds the last head.
func (l *Log) Close() error {
	l.mu.Lock()
	for l.syncing {
		l.cond.Wait()
	}
	if l.f == nil {
		l.mu.Unlock()
		return nil
	}
	err := l.f.Close()
	l.f = nil
	failed := l.failed
	l.mu.Unlock()
	if l.anchor != nil {
		close(l.anchorStop)
		close(l.anchorReq) // no more sends: l.f is nil, so no syncer runs
		<-l.anchorDone
		if failed == nil {
			l.mu.Lock()
			failed = l.failed
			h := Head{Seq: l.synced, Hash: l.syncedHash, Clean: true, KeyedFrom: l.keyedFrom}
			l.mu.Unlock()
			if failed == nil {
				// The last head, marked: nothing may follow it until a key
				// service opens the log again.
				failed = l.anchor.SaveHead(h)
			}
			if failed != nil && err == nil {
				err = failed
			}
		}
	}
	return err
}

// saveAnchors saves the newest synced head whenever there is one. A failed
// save closes the log to further entries: without its anchor the log
// could be cut short unnoticed.
func (l *Log) saveAnchors() {
	defer close(l.anchorDone)
	for range l.anchorReq {
		l.mu.Lock()
		h := l.anchorHead
		l.mu.Unlock()
		if err := l.anchor.SaveHead(h); err != nil {
			l.mu.Lock()
			if l.failed == nil {
				l.failed = fmt.Errorf("audit: saving the anchor failed, log closed to further entries: %w", err)
			}
			l.mu.Unlock()
		}
		select { // pace the saves; a pending request is served after
		case <-time.After(AnchorEvery):
		case <-l.anchorStop:
		}
	}
}

// Result is what Verify found in a sound log.
type Result struct {
	Entries int
	Head    string // the last Hash (the genesis value for an empty log)
	// Keyed counts the entries that carry a MAC (the keyed part of the
	// log, from its first such entry on); MACsChecked says whether their
	// MACs were checked (the verifier had the key) or only their form.
	Keyed       int
	MACsChecked bool
	// FirstKeyed is the first entry with a MAC (0: none).
	FirstKeyed uint64
}

// VerifyError names the first line that breaks the chain.
type VerifyError struct {
	Line   int
	Reason string
	cause  error // ErrAnchor for a log that does not reach its anchor, ErrTornEnd for a last line without newline
}

func (e *VerifyError) Error() string { return fmt.Sprintf("line %d: %s", e.Line, e.Reason) }

// Unwrap lets errors.Is find ErrAnchor and ErrTornEnd.
func (e *VerifyError) Unwrap() error { return e.cause }

// VerifyAnchored is Verify for a log whose head was anchored: it must also
// hold the anchored entry itself, unchanged (entry h.Seq with hash h.Hash),
// and may have entries after it. A log that ends before it had lines cut
// from its end; one whose entry there differs was rewritten.
func VerifyAnchored(r io.Reader, h Head) (Result, error) {
	return VerifyAnchoredKeyed(r, h, nil, nil)
}

// VerifyAnchoredKeyed is VerifyAnchored with the MACs checked under k (if
// set) and each (if set) given every sound entry. A head saved as its key
// service closed the log (Clean) must be the log's last entry: one after
// it was added while no key service ran.
func VerifyAnchoredKeyed(r io.Reader, h Head, k Keyer, each func(Entry)) (Result, error) {
	return verifyAnchored(r, h, k, each, false)
}

func verifyAnchored(r io.Reader, h Head, k Keyer, each func(Entry), allowPastClean bool) (Result, error) {
	var atAnchor string
	res, err := verify(r, k, func(e *Entry) {
		if e.Seq == h.Seq {
			atAnchor = e.Hash
		}
		if each != nil {
			each(*e)
		}
	}, h.KeyedFrom)
	switch {
	case err != nil:
		return res, err
	case h.Clean && uint64(res.Entries) > h.Seq && !allowPastClean:
		return res, &VerifyError{int(h.Seq) + 1, fmt.Sprintf("entries after the head the store holds from a clean stop (entry %d): the store was restored from an older copy (start the key server with --restored), or entries were added while no key service ran", h.Seq), ErrPastClean}
	case h.Seq == 0:
		return res, nil
	case uint64(res.Entries) < h.Seq:
		return res, &VerifyError{res.Entries + 1, fmt.Sprintf("the log ends after %d entries, but %d were written (lines were removed from the end)", res.Entries, h.Seq), ErrAnchor}
	case atAnchor != h.Hash:
		return res, &VerifyError{int(h.Seq), "differs from the entry written there (the log was rewritten from here or before)", ErrAnchor}
	}
	return res, nil
}

// Verify reads a whole log and checks every line: it parses strictly (no
// unknown fields), its sequence number follows the one before, its Prev is
// the previous line's Hash, its Hash matches its content, and its bytes are
// exactly the writer's encoding of that content.
func Verify(r io.Reader) (Result, error) {
	return verify(r, nil, nil, 0)
}

// VerifyKeyed is Verify that also checks every MAC under k, and that no
// entry without one follows an entry with one (the keyed part of a log
// cannot be extended without the key).
func VerifyKeyed(r io.Reader, k Keyer, each func(Entry)) (Result, error) {
	var f func(*Entry)
	if each != nil {
		f = func(e *Entry) { each(*e) }
	}
	return verify(r, k, f, 0)
}

// Walk is Verify that also calls each with every entry, in order, as it is
// found sound: an entry is never given before its line was checked, so a
// caller that stops at the first error has seen only entries of the
// intact part of the log.
func Walk(r io.Reader, each func(Entry)) (Result, error) {
	return verify(r, nil, func(e *Entry) { each(*e) }, 0)
}

// timeSkew is how far a keyed entry may be dated before the one it
// follows (key-server replicas' clocks differ; one writer never goes
// back).
const timeSkew = 5 * time.Minute

// verify is Verify, with MACs checked under k if set, calling each (if
// set) with every sound entry. Decoding each line and computing its hash
// and MAC (most of the work, and independent from line to line) runs on
// every core, a batch of lines at a time; the checks that follow the chain
// run in order (a key server's start reads its whole log: issue 36).
func verify(r io.Reader, k Keyer, each func(*Entry), keyedFrom uint64) (Result, error) {
	res := Result{Head: genesis, MACsChecked: k != nil}
	quit := make(chan struct{})
	batches := readBatches(r, k, quit)
	defer func() {
		close(quit)
		for range batches { // the reader and workers end
		}
	}()
	line := 0
	var last time.Time
	changes := map[string]bool{} // changes whose own entry was seen
	for b := range batches {
		<-b.done
		for i := range b.lines {
			l := &b.lines[i]
			line++
			if l.readErr != nil {
				return res, &VerifyError{Line: line, Reason: l.readErr.Error(), cause: l.cause}
			}
			if l.eof {
				return res, nil
			}
			e := &l.e
			if l.decodeErr != nil {
				return res, &VerifyError{Line: line, Reason: "not a valid entry: " + l.decodeErr.Error()}
			}
			if e.Seq != uint64(line) {
				return res, &VerifyError{Line: line, Reason: fmt.Sprintf("sequence number %d where %d belongs (a line was removed, added or moved)", e.Seq, line)}
			}
			if e.Prev != res.Head {
				return res, &VerifyError{Line: line, Reason: "does not chain to the line before (a line was removed, added or moved)"}
			}
			if e.Decision != Allow && e.Decision != Deny {
				return res, &VerifyError{Line: line, Reason: "decision is neither allow nor deny"}
			}
			claimed, claimedMAC := l.claimed, l.claimedMAC
			if res.Keyed > 0 && claimedMAC == "" {
				return res, &VerifyError{Line: line, Reason: "no MAC after entries with one (an entry added by someone without the key service's KEK)"}
			}
			if keyedFrom > 0 && e.Seq >= keyedFrom && claimedMAC == "" {
				return res, &VerifyError{Line: line, Reason: fmt.Sprintf("no MAC, but the store's anchor says every entry from %d on has one (MACs stripped, or an entry added without the KEK)", keyedFrom)}
			}
			if l.sealErr != nil {
				return res, &VerifyError{Line: line, Reason: l.sealErr.Error()}
			}
			if e.Hash != claimed {
				return res, &VerifyError{Line: line, Reason: "hash does not match the content (the line was edited)"}
			}
			if k != nil && claimedMAC != "" {
				got, _ := hex.DecodeString(claimedMAC)
				want, _ := hex.DecodeString(e.MAC)
				if !hmac.Equal(got, want) {
					return res, &VerifyError{Line: line, Reason: "the MAC does not verify under this key service's KEK (an entry written by someone else, or another KEK)"}
				}
			}
			if claimedMAC != "" {
				if res.Keyed > 0 && e.Time.Before(last.Add(-timeSkew)) {
					return res, &VerifyError{Line: line, Reason: fmt.Sprintf("dated %s, before the entry it follows (%s)", e.Time.Format(time.RFC3339), last.Format(time.RFC3339))}
				}
				if res.Keyed == 0 {
					res.FirstKeyed = e.Seq
				}
				res.Keyed++
			}
			if e.Sight != nil && e.Change != "" && !changes[e.Change] {
				return res, &VerifyError{Line: line, Reason: fmt.Sprintf("a sight entry of change %s before the change's own entry", e.Change)}
			}
			if e.Change != "" && e.Sight == nil {
				changes[e.Change] = true
			}
			last = e.Time
			// The line must be exactly the writer's encoding: no byte of it
			// may change, not even one that leaves the values alone (a CR
			// before the newline, a space).
			if !l.canonical {
				return res, &VerifyError{Line: line, Reason: "not in the writer's exact encoding (the line was edited)"}
			}
			res.Entries, res.Head = line, e.Hash
			if each != nil {
				each(e)
			}
		}
	}
	return res, nil
}

// verifyBatch is how many lines a worker takes at a time.
const verifyBatch = 256

// checkedLine is one line of a log as a worker found it: decoded, its
// hash and MAC computed (unless the line ended the reading).
type checkedLine struct {
	raw                 []byte
	e                   Entry
	claimed, claimedMAC string
	decodeErr, sealErr  error
	canonical           bool
	readErr, cause      error // the reading stopped here (cause: ErrTornEnd)
	eof                 bool
}

// lineBatch is lines in order, done once a worker has checked them.
type lineBatch struct {
	lines []checkedLine
	done  chan struct{}
}

// readBatches reads r's lines in batches, in order, each checked by one
// of GOMAXPROCS workers; the channel ends after the batch where reading
// stopped (the end, or an error).
func readBatches(r io.Reader, k Keyer, quit <-chan struct{}) <-chan *lineBatch {
	out := make(chan *lineBatch, 2*runtime.GOMAXPROCS(0))
	work := make(chan *lineBatch, 2*runtime.GOMAXPROCS(0))
	var wg sync.WaitGroup
	for range runtime.GOMAXPROCS(0) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for b := range work {
				for i := range b.lines {
					b.lines[i].check(k)
				}
				close(b.done)
			}
		}()
	}
	go func() {
		defer func() { close(work); wg.Wait(); close(out) }()
		br := bufio.NewReaderSize(r, MaxLine+1)
		for {
			b := &lineBatch{done: make(chan struct{})}
			stop := false
			for len(b.lines) < verifyBatch && !stop {
				raw, err := br.ReadSlice('\n')
				var l checkedLine
				switch {
				case len(raw) == 0 && err == io.EOF:
					l.eof, stop = true, true
				case err == bufio.ErrBufferFull:
					l.readErr, stop = fmt.Errorf("longer than %d bytes, the most the writer writes", MaxLine), true
				case err == io.EOF:
					l.readErr, l.cause, stop = errors.New("no newline at the end (a write cut short; the key server drops it at its next start)"), ErrTornEnd, true
				case err != nil:
					l.readErr, stop = err, true
				default:
					l.raw = bytes.Clone(raw[:len(raw)-1])
				}
				b.lines = append(b.lines, l)
			}
			select {
			case work <- b:
			case <-quit:
				return
			}
			select {
			case out <- b:
			case <-quit:
				return
			}
			if stop {
				return
			}
		}
	}()
	return out
}

// check decodes the line and computes its hash and MAC as the writer
// would have: the work that does not depend on the lines before.
func (l *checkedLine) check(k Keyer) {
	if l.raw == nil {
		return
	}
	dec := json.NewDecoder(bytes.NewReader(l.raw))
	dec.DisallowUnknownFields()
	if l.decodeErr = dec.Decode(&l.e); l.decodeErr != nil {
		return
	}
	l.claimed, l.claimedMAC = l.e.Hash, l.e.MAC
	kk := k
	if l.claimedMAC == "" {
		kk = nil // an entry from before the log was keyed
	}
	canonical, err := l.e.seal(kk)
	if l.sealErr = err; err != nil {
		return
	}
	l.canonical = bytes.Equal(canonical, l.raw)
	l.raw = nil
}
