package server

import (
	"slices"
	"strings"
	"sync"

	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	pb "github.com/shim-run/shim/proto/shimv1"
)

// Encoded process records.
//
// Encoding 100,000 records for `shim ps` took this VM ~300 ms of the
// server's CPU on every call, although records are immutable and most have
// not changed since the last listing. The server keeps each listed record's
// encoding, keyed by id and checked against the record's pointer (a change
// stores a new record), and sends a binary List answer as pre-encoded bytes:
// ListResponse's processes field, written out as the unknown fields of an
// otherwise empty answer, which is the same wire format. Clients that speak
// JSON get a normal answer (protojson drops unknown fields).

type encodedRecord struct {
	rec *pb.ProcessRecord
	b   []byte
}

type recordCache struct {
	mu   sync.Mutex
	m    map[string]encodedRecord
	last []*pb.ProcessRecord // the records of the last answer...
	out  []byte              // ...and the answer
}

// encode returns the processes field of a ListResponse holding recs, in wire
// format. recs is a page of the whole table's listing, which holds limit
// records: the cache keeps the encodings of every page listed, and starts
// afresh from this page's once it holds more than twice the table (so a
// record the table dropped is not kept for long).
func (c *recordCache) encode(recs []*pb.ProcessRecord, limit int) ([]byte, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if slices.Equal(recs, c.last) {
		return c.out, nil // nothing changed since the last listing: the same answer
	}
	if c.m == nil || len(c.m) > 2*limit+1024 {
		c.m = make(map[string]encodedRecord, len(recs))
	}
	size := 0
	for _, r := range recs {
		e, ok := c.m[r.Id]
		if !ok || e.rec != r {
			b, err := proto.Marshal(r)
			if err != nil {
				return nil, err
			}
			e = encodedRecord{rec: r, b: b}
			c.m[r.Id] = e
		}
		size += 1 + protowire.SizeVarint(uint64(len(e.b))) + len(e.b)
	}
	out := make([]byte, 0, size)
	for _, r := range recs {
		out = protowire.AppendTag(out, 1, protowire.BytesType) // ListResponse.processes
		out = protowire.AppendBytes(out, c.m[r.Id].b)
	}
	c.last, c.out = recs, out
	return out, nil
}

// binaryCodec reports whether a request's answer will be encoded as binary
// protobuf (Connect, gRPC and gRPC-Web without +json).
func binaryCodec(contentType string) bool {
	return !strings.Contains(strings.ToLower(contentType), "json")
}
