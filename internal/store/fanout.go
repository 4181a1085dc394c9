package store

import (
	"context"
	"sync"

	"github.com/enclavekeys/enclave/internal/registry"
)

// fanout hands each registry a store commits (or follows) to its watchers
// (Store.Watch): a slow watcher keeps only the latest.
type fanout struct {
	mu    sync.Mutex
	chans map[chan *registry.State]struct{}
}

// watch delivers the registries sent from now until ctx ends.
func (f *fanout) watch(ctx context.Context) <-chan *registry.State {
	ch := make(chan *registry.State, 1)
	f.mu.Lock()
	if f.chans == nil {
		f.chans = map[chan *registry.State]struct{}{}
	}
	f.chans[ch] = struct{}{}
	f.mu.Unlock()
	go func() {
		<-ctx.Done()
		f.mu.Lock()
		delete(f.chans, ch)
		close(ch)
		f.mu.Unlock()
	}()
	return ch
}

// send gives st to every watcher, in place of one it has not taken yet.
func (f *fanout) send(st *registry.State) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for ch := range f.chans {
		select {
		case <-ch:
		default:
		}
		ch <- st
	}
}
