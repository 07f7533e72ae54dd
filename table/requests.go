package table

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"slices"
	"time"

	"google.golang.org/protobuf/proto"

	pb "github.com/shim-run/shim/proto/shimv1"
)

// Client request IDs: exactly-once spawns.
//
// A client that loses the answer to a spawn (a connection reset, a leader
// that died after committing, a deadline) cannot tell whether the spawn
// happened. It retries with the same request id, and the table answers the
// retry with the processes the first one created and creates nothing. A retry
// with the same id but another spec or count is refused.
//
// The table remembers a request id for RequestTTL after its spawn was applied,
// and at most MaxRequests of them, oldest dropped first. Age is measured in
// command time (now_unix_nano, set by the proposing server), so every replica
// drops the same ones; records are kept in snapshots. A spawn that fails
// (invalid, no room) is not remembered: it created nothing, and its retry
// tries again.
const (
	// RequestTTL is how long a request id is remembered: far longer than a
	// client retries one spawn.
	RequestTTL = 10 * time.Minute
	// MaxRequests bounds the request ids remembered (about 150 bytes each).
	MaxRequests = 100_000
	// MaxRequestIDLen bounds a request id's length.
	MaxRequestIDLen = 64
)

// requests is the table's memory of request ids: a map, and the records in
// the order they were applied (fifo[head:]), which is the order they expire
// in.
type requests struct {
	byID map[string]*pb.RequestRecord
	fifo []*pb.RequestRecord
	head int
}

func newRequests() requests { return requests{byID: map[string]*pb.RequestRecord{}} }

// ValidateRequestID checks a client's request id: 1 to MaxRequestIDLen
// letters, digits, '.', '_' or '-'.
func ValidateRequestID(id string) error {
	if id == "" || len(id) > MaxRequestIDLen {
		return fmt.Errorf("%w: request id must be 1 to %d characters", ErrInvalid, MaxRequestIDLen)
	}
	for _, c := range []byte(id) {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-') {
			return fmt.Errorf("%w: request id %q: use letters, digits, '.', '_' and '-'", ErrInvalid, id)
		}
	}
	return nil
}

// spawnDigest identifies what a spawn asks for: its spec and its count.
func spawnDigest(spec *pb.ProcessSpec, count int) []byte {
	b, _ := proto.MarshalOptions{Deterministic: true}.Marshal(spec)
	b = binary.BigEndian.AppendUint64(b, uint64(count))
	sum := sha256.Sum256(b)
	return sum[:16]
}

// spawnOnce applies a Spawn, answering a retry of a remembered request with
// the first answer.
func (x *txn) spawnOnce(s *pb.Spawn) ([]string, error) {
	rid := s.GetRequestId()
	do := func() ([]string, error) {
		if s.GetService() {
			return x.spawnService(s)
		}
		return x.spawnPinned(s)
	}
	if rid == "" {
		return do()
	}
	if err := ValidateRequestID(rid); err != nil {
		return nil, err
	}
	t := x.t
	digest := spawnDigest(s.GetSpec(), len(s.GetIds()))
	if r := t.requests.byID[rid]; r != nil && !expired(r, x.now) {
		if !bytes.Equal(r.Digest, digest) {
			return nil, fmt.Errorf("%w: request id %s was used for a different spawn", ErrExists, rid)
		}
		return slices.Clone(r.Ids), nil
	}
	ids, err := do()
	if err != nil {
		return nil, err
	}
	t.requests.expire(x.now, MaxRequests-1)
	t.requests.add(&pb.RequestRecord{Id: rid, Ids: slices.Clone(ids), Digest: digest, UnixNano: x.now})
	return ids, nil
}

func expired(r *pb.RequestRecord, now int64) bool {
	return r.UnixNano < now-int64(RequestTTL)
}

// expire drops the oldest records while they are older than RequestTTL at
// now, or more than keep are remembered.
func (q *requests) expire(now int64, keep int) {
	for q.head < len(q.fifo) {
		r := q.fifo[q.head]
		if len(q.fifo)-q.head <= keep && !expired(r, now) {
			break
		}
		if q.byID[r.Id] == r {
			delete(q.byID, r.Id)
		}
		q.fifo[q.head] = nil
		q.head++
	}
	if q.head > 1024 && q.head > len(q.fifo)/2 {
		q.fifo = slices.Clone(q.fifo[q.head:])
		q.head = 0
	}
}

func (q *requests) add(r *pb.RequestRecord) {
	q.byID[r.Id] = r
	q.fifo = append(q.fifo, r)
}

// live returns the remembered records, oldest first.
func (q *requests) live() []*pb.RequestRecord {
	return slices.Clone(q.fifo[q.head:])
}

// restore replaces the records with a snapshot's, oldest first.
func (q *requests) restore(recs []*pb.RequestRecord) {
	*q = newRequests()
	for _, r := range recs {
		if r.GetId() != "" {
			q.add(r)
		}
	}
}

// Request returns the processes a remembered request created, or nil.
func (t *Table) Request(id string) []string {
	t.mu.RLock()
	defer t.mu.RUnlock()
	if r := t.requests.byID[id]; r != nil {
		return slices.Clone(r.Ids)
	}
	return nil
}

// Requests returns how many request ids the table remembers.
func (t *Table) Requests() int {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return len(t.requests.fifo) - t.requests.head
}
