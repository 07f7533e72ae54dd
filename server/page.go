package server

import (
	"fmt"
	"strconv"
	"strings"

	"google.golang.org/protobuf/proto"

	pb "github.com/shim-run/shim/proto/shimv1"
)

// List answers in pages, so no answer is built whole: at most a page's
// records and at most MaxPageBytes of them (a record's spec may be near
// MaxRequestBytes; a page holds at least one record). The page token names
// the last record sent (its creation time and id); the next page starts
// after it in the list's order. Were that record pruned meanwhile, the next
// page starts at the first record created after it.

const (
	DefaultPageSize = 1000
	MaxPageSize     = 10000
	MaxPageBytes    = 4 << 20
)

// pageToken is the cursor after rec.
func pageToken(rec *pb.ProcessRecord) string {
	return strconv.FormatInt(rec.GetCreatedUnixNano(), 10) + "." + rec.GetId()
}

func parsePageToken(tok string) (created int64, id string, err error) {
	c, id, ok := strings.Cut(tok, ".")
	if ok {
		created, err = strconv.ParseInt(c, 10, 64)
	}
	if !ok || err != nil || id == "" {
		return 0, "", fmt.Errorf("page_token %q is not one a List answer gave", tok)
	}
	return created, id, nil
}

// page cuts recs (in list order) to the page after tok of at most size
// records (0 = DefaultPageSize) and MaxPageBytes, and returns the token of
// the next page ("" if it is the last).
func page(recs []*pb.ProcessRecord, tok string, size int32) ([]*pb.ProcessRecord, string, error) {
	if size < 0 {
		return nil, "", fmt.Errorf("page_size %d is negative", size)
	}
	n := int(size)
	if n == 0 {
		n = DefaultPageSize
	}
	n = min(n, MaxPageSize)
	if tok != "" {
		created, id, err := parsePageToken(tok)
		if err != nil {
			return nil, "", err
		}
		start := -1
		for i, r := range recs {
			if r.GetId() == id {
				start = i + 1
				break
			}
		}
		if start < 0 { // gone: after every record created up to it
			start = len(recs)
			for i, r := range recs {
				if r.GetCreatedUnixNano() > created {
					start = i
					break
				}
			}
		}
		recs = recs[start:]
	}
	bytes, end := 0, 0
	for end < len(recs) && end < n {
		bytes += proto.Size(recs[end])
		if end > 0 && bytes > MaxPageBytes {
			break
		}
		end++
	}
	if end == len(recs) {
		return recs, "", nil
	}
	return recs[:end], pageToken(recs[end-1]), nil
}
