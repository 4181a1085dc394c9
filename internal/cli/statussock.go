package cli

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"syscall"
)

// errUntrusted is a status socket or directory another user could have
// put there: its answer could be anyone's.
var errUntrusted = errors.New("not to be trusted")

// ownDir checks that dir is a directory (not a link) of this user that
// no one else may write in: nobody else can put a socket there, nor
// replace ours. A directory another user made first (say
// /tmp/enclave-UID, mode 0777) is refused.
func ownDir(dir string) error {
	st, uid, err := owned(dir)
	switch {
	case err != nil:
		return err
	case !st.IsDir():
		return fmt.Errorf("%s is not a directory (%v): %w", dir, st.Mode().Type(), errUntrusted)
	case int(uid) != os.Geteuid():
		return fmt.Errorf("%s belongs to uid %d, not to this user (uid %d): %w", dir, uid, os.Geteuid(), errUntrusted)
	case st.Mode().Perm()&0o022 != 0:
		return fmt.Errorf("%s has mode %v: others may write in it: %w", dir, st.Mode().Perm(), errUntrusted)
	}
	return nil
}

// trustedSocket checks, before enclave status believes an answer, that
// nobody but this user, root, or an account root gave the directory to
// (a service's, as systemd's RuntimeDirectory= makes) can have put the
// socket at path there. Its directory must belong to this user or root,
// or, directly under /run (root's), to a service's account: /run/enclave
// made by root for the service is trusted; /tmp/enclave-UID, which anyone
// could make first, or a link to another user's home, is not.
// Nobody else may write in it; in a sticky one, such as /tmp itself,
// where anyone may add a file but only its owner replace it, the socket
// must be this user's or root's.
func trustedSocket(path string) error {
	me := uint32(os.Geteuid())
	dir, err := filepath.Abs(filepath.Dir(path))
	if err != nil {
		return err
	}
	// A link in the path's last directory is followed only if this user
	// or root made it (one another user put in /tmp could point anywhere,
	// their home directory included).
	if lst, luid, err := owned(dir); err == nil && lst.Mode()&fs.ModeSymlink != 0 {
		if luid != me && luid != 0 {
			return fmt.Errorf("status socket %s: %s is a link made by uid %d, neither you (uid %d) nor root; remove it or give --socket: %w", path, dir, luid, me, errUntrusted)
		}
		if dir, err = filepath.EvalSymlinks(dir); err != nil {
			return err
		}
	}
	dst, duid, err := owned(dir)
	if err != nil {
		return err
	}
	if !dst.IsDir() {
		return fmt.Errorf("status socket %s: %s is not a directory: %w", path, dir, errUntrusted)
	}
	if duid != me && duid != 0 {
		// Only a service's runtime directory, which root made under /run
		// for the service's account (systemd's RuntimeDirectory=), may
		// belong to another account.
		parent := filepath.Dir(dir)
		pst, puid, err := owned(parent)
		if err != nil {
			return err
		}
		if (parent != "/run" && parent != "/var/run") || puid != 0 || pst.Mode().Perm()&0o022 != 0 {
			return fmt.Errorf("status socket %s: its directory %s belongs to uid %d, neither you (uid %d) nor root, and is no service's directory under /run; remove it or give --socket: %w", path, dir, duid, me, errUntrusted)
		}
	}
	sticky := dst.Mode()&fs.ModeSticky != 0
	if dst.Mode().Perm()&0o022 != 0 && !sticky {
		return fmt.Errorf("status socket %s: others may write in its directory %s (mode %v); remove it or give --socket: %w", path, dir, dst.Mode().Perm(), errUntrusted)
	}
	sst, suid, err := owned(filepath.Join(dir, filepath.Base(path)))
	if err != nil {
		return err
	}
	if sst.Mode().Type() != fs.ModeSocket {
		return fmt.Errorf("status socket %s is not a socket: %w", path, errUntrusted)
	}
	if sticky && suid != me && suid != 0 {
		return fmt.Errorf("status socket %s belongs to uid %d, not to you (uid %d) or root: %w", path, suid, me, errUntrusted)
	}
	return nil
}

// owned is p's file information (not following a link at p) and owner.
func owned(p string) (fs.FileInfo, uint32, error) {
	st, err := os.Lstat(p)
	if err != nil {
		return nil, 0, err
	}
	sys, ok := st.Sys().(*syscall.Stat_t)
	if !ok {
		return nil, 0, fmt.Errorf("%s: no owner to check: %w", p, errUntrusted)
	}
	return st, sys.Uid, nil
}

// listenPrivate listens on a Unix socket at path that nobody but this
// user can connect to at any moment: the socket is made in a fresh
// private directory beside path, given mode 0600 there, and renamed into
// place (a socket made at path directly has the umask's mode until a
// chmod; changing the umask would change it for the whole process).
func listenPrivate(path string) (net.Listener, error) {
	tmp, err := os.MkdirTemp(filepath.Dir(path), ".status-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(tmp)
	inner := filepath.Join(tmp, "s")
	ln, err := net.Listen("unix", inner)
	if err != nil {
		return nil, err
	}
	ul := ln.(*net.UnixListener)
	ul.SetUnlinkOnClose(false) // its name moves; serveStatus removes it
	if err := os.Chmod(inner, 0o600); err != nil {
		ln.Close()
		return nil, err
	}
	if err := os.Rename(inner, path); err != nil {
		ln.Close()
		return nil, err
	}
	return ln, nil
}
