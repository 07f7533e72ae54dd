package agent

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/shim-run/shim/table"
)

// The agent's record of the processes it runs, for a restarted shimd to adopt.
//
// It is one append-only file of JSON lines (<data-dir>/state.log): a line per
// start or change, and a tombstone when a process is gone; the last line for
// an id wins. Appending to an open file creates no inode, where a file per
// process (written beside it and renamed into place, then removed) made three
// directory changes per process. Those were a third of shimd's CPU when it
// started processes in bulk on this project's ext4 without a journal, which
// scans past every inode freed in the last 12 hours to allocate a new one.
//
// The file is rewritten with only the live entries when it has grown to
// several times their number, so its size is O(processes) and the rewrite's
// cost is spread over the appends that made it due. Nothing is fsynced: the
// record describes running processes, which a host crash ends anyway, and a
// torn last line (shimd killed mid-write) is skipped on reading.
type stateLog struct {
	mu    sync.Mutex
	path  string
	f     *os.File
	live  map[string]state
	lines int // lines in the file
}

// stateLine is one line of the file.
type stateLine struct {
	ID   string `json:"id"`
	Gone bool   `json:"gone,omitempty"`
	state
}

// openStateLog reads the record in dir, takes in the per-process files of
// older shimd versions (dir/state/ID.json), and rewrites it compactly.
func openStateLog(dir string) (*stateLog, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("process state: %w", err)
	}
	s := &stateLog{path: filepath.Join(dir, "state.log"), live: map[string]state{}}
	b, err := os.ReadFile(s.path)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("read process state: %w", err)
	}
	for line := range bytes.Lines(b) {
		var l stateLine
		if json.Unmarshal(line, &l) != nil || table.ValidateID(l.ID) != nil {
			continue // torn by a crash mid-write
		}
		if l.Gone {
			delete(s.live, l.ID)
		} else {
			s.live[l.ID] = l.state
		}
	}
	legacy := filepath.Join(dir, "state")
	entries, _ := os.ReadDir(legacy)
	for _, e := range entries {
		id, ok := strings.CutSuffix(e.Name(), ".json")
		if _, seen := s.live[id]; !ok || seen || table.ValidateID(id) != nil {
			continue
		}
		var st state
		if b, err := os.ReadFile(filepath.Join(legacy, e.Name())); err == nil && json.Unmarshal(b, &st) == nil {
			s.live[id] = st
		}
	}
	if err := s.rewrite(); err != nil {
		return nil, err
	}
	if len(entries) > 0 {
		_ = os.RemoveAll(legacy) // its entries are in the new file now
	}
	return s, nil
}

// all returns a copy of the live entries.
func (s *stateLog) all() map[string]state {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make(map[string]state, len(s.live))
	for id, st := range s.live {
		out[id] = st
	}
	return out
}

// put records id's state.
func (s *stateLog) put(id string, st state) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.live[id] = st
	return s.append(stateLine{ID: id, state: st})
}

// drop records that id is gone.
func (s *stateLog) drop(id string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.live[id]; !ok {
		return nil
	}
	delete(s.live, id)
	return s.append(stateLine{ID: id, Gone: true})
}

func (s *stateLog) append(l stateLine) error {
	if s.lines >= 4*len(s.live)+256 {
		return s.rewrite() // writes l's effect too: s.live already has it
	}
	b, err := json.Marshal(l)
	if err != nil {
		return err
	}
	s.lines++
	if _, err := s.f.Write(append(b, '\n')); err != nil {
		return fmt.Errorf("append process state: %w", err)
	}
	return nil
}

// rewrite replaces the file with the live entries alone, written beside it
// and renamed into place, and opens it for appending.
func (s *stateLog) rewrite() error {
	tmp := s.path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o644)
	if err != nil {
		return fmt.Errorf("rewrite process state: %w", err)
	}
	w := bufio.NewWriter(f)
	enc := json.NewEncoder(w)
	for id, st := range s.live {
		if err = enc.Encode(stateLine{ID: id, state: st}); err != nil {
			break
		}
	}
	if err == nil {
		err = w.Flush()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, s.path)
	}
	if err != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("rewrite process state: %w", err)
	}
	nf, err := os.OpenFile(s.path, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		return fmt.Errorf("open process state: %w", err)
	}
	if s.f != nil {
		_ = s.f.Close()
	}
	s.f, s.lines = nf, len(s.live)
	return nil
}
