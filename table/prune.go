package table

import "slices"

// Bounded history. Ended processes stay in the table (shim ps -a, their
// exit codes) until the leader prunes them: after a retention, and beyond
// a cap on how many ended records the table keeps, oldest first. The
// leader decides when and issues a Prune command holding the cutoff time,
// so every replica drops the same records (the table has no clock).
// Incarnations kept per process are capped at historyLimit (nodes.go).

// PruneCutoff returns the cutoff for a Prune command that drops every
// ended process that finished before before, and the oldest further ones
// beyond keep (keep <= 0: no cap); 0 if there is nothing to prune.
func (t *Table) PruneCutoff(before int64, keep int) int64 {
	t.mu.RLock()
	var ended []int64
	prunable := false
	for _, r := range t.procs {
		if live(r) {
			continue
		}
		if r.FinishedUnixNano < before {
			prunable = true
		}
		if keep > 0 {
			ended = append(ended, r.FinishedUnixNano)
		}
	}
	t.mu.RUnlock()
	cut := int64(0)
	if prunable {
		cut = before
	}
	if keep > 0 && len(ended) > keep {
		slices.Sort(ended)
		// Drop the oldest len-keep: everything finished before the
		// (len-keep)th oldest's time, plus it (ties may keep a few more).
		if c := ended[len(ended)-keep-1] + 1; c > cut {
			cut = c
		}
	}
	return cut
}
