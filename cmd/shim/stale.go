package main

import (
	"bytes"
	"encoding/json"
	"io"

	pb "github.com/shim-run/shim/proto/shimv1"
)

// Stale reads.
//
// Reads are linearizable by default: the member that answers first makes
// sure its copy of the table holds every write acknowledged before the read
// (a round trip to the leader). --stale skips that and takes the member's
// copy as it is, which is faster and works without a leader, but may be
// behind. With -o json the answer then says how far: see stalenessJSON.

// consistency is what reads ask for.
func (a *app) consistency() pb.Consistency {
	if a.stale {
		return pb.Consistency_CONSISTENCY_STALE
	}
	return pb.Consistency_CONSISTENCY_UNSPECIFIED
}

// stalenessJSON says how old the answering member's copy may have been.
type stalenessJSON struct {
	Member string `json:"member"` // the address that answered
	// Index is the log index its table had applied; LeaderIndex the
	// leader's commit index as it last heard it; Behind the difference.
	Index       uint64 `json:"index"`
	LeaderIndex uint64 `json:"leader_index"`
	Behind      uint64 `json:"behind"`
	// LastContactMillis is how long since it last heard from the leader:
	// 0 on the leader, -1 if it never has.
	LastContactMillis int64 `json:"last_contact_ms"`
}

// member is the address that answered the last call.
func (a *app) member() string {
	if a.cl == nil {
		return ""
	}
	return a.cl.Member()
}

// writeStaleJSON prints {"staleness": ..., key: items}, where items writes a
// JSON array.
func (a *app) writeStaleJSON(w io.Writer, st *pb.Staleness, key string, items func(io.Writer) error) error {
	var buf bytes.Buffer
	if err := items(&buf); err != nil {
		return err
	}
	v := stalenessJSON{Member: a.member(), Index: st.GetIndex(), LeaderIndex: st.GetLeaderIndex(),
		LastContactMillis: st.GetLastContactMillis()}
	if v.LeaderIndex > v.Index {
		v.Behind = v.LeaderIndex - v.Index
	}
	sj, err := json.Marshal(v)
	if err != nil {
		return err
	}
	kj, _ := json.Marshal(key)
	raw := make([]byte, 0, buf.Len()+len(sj)+64)
	raw = append(append(append(raw, `{"staleness":`...), sj...), ',')
	raw = append(append(append(raw, kj...), ':'), buf.Bytes()...)
	raw = append(raw, '}')
	var out bytes.Buffer
	if err := json.Indent(&out, raw, "", "  "); err != nil {
		return err
	}
	out.WriteByte('\n')
	_, err = w.Write(out.Bytes())
	return err
}
