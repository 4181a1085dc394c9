package handshake

import (
	"log/slog"
	"time"
)

// CertWarnBefore is how long before its certificate's end a device warns
// (log, status, metric), and CertWarnEvery how often it says so again.
const (
	CertWarnBefore = 14 * 24 * time.Hour
	CertWarnEvery  = 24 * time.Hour
)

// CertWarner says, in a device's log, that its own certificate ends soon
// (at most once per CertWarnEvery) or has ended (at once). Its methods
// belong to one goroutine (a device's timers).
type CertWarner struct {
	checked, warned time.Time
	expired         bool
}

// Due reports whether Check should run at now: once a minute, and at once
// when the certificate ending at end has ended unsaid.
func (w *CertWarner) Due(now, end time.Time) bool {
	return now.Sub(w.checked) >= time.Minute || (!w.expired && !now.Before(end))
}

// Check logs, as the device named by log, how its certificate ending at
// end stands at now.
func (w *CertWarner) Check(now, end time.Time, log *slog.Logger) {
	w.checked = now
	left := end.Sub(now)
	switch {
	case left <= 0:
		if w.expired {
			return
		}
		w.warned, w.expired = now, true
		log.Error("this device's certificate has expired: no peer accepts a new SA or session with it; renew it (enclave cert renew, or a new join) and send SIGHUP", "expired", end.UTC().Format(time.RFC3339))
	case left <= CertWarnBefore && now.Sub(w.warned) >= CertWarnEvery:
		w.warned, w.expired = now, false
		log.Warn("this device's certificate expires soon: renew it (enclave cert renew, or a new join) and send SIGHUP", "expires", end.UTC().Format(time.RFC3339), "in", left.Round(time.Second).String())
	case left > CertWarnBefore:
		w.expired = false // renewed
	}
}
