package server

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"sync/atomic"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	pb "github.com/shim-run/shim/proto/shimv1"
)

// Bounded requests. No one request may cost a server more than a bounded
// amount of memory or hold a connection forever:
//   - a body larger than MaxRequestBytes is refused with 413 (connect's own
//     limit answers 429, which says "retry later", wrongly);
//   - a body must arrive within BodyTimeout of the request's start: a read
//     deadline on the connection (http.ResponseController), cleared once
//     the body has been read whole, so long polls and server streams that
//     follow keep their connection; the heartbeat stream, whose body is the
//     stream, has none;
//   - unknown JSON fields are refused, not silently dropped (a misspelt
//     field would otherwise be a default the caller did not ask for);
//   - one Spawn makes at most MaxSpawnBytes of records (count × spec size);
//   - List answers in pages (page.go), and a blocking query waits at most
//     MaxWait (shim.go).

// DefaultBodyTimeout is how long a request's body may take to arrive.
const DefaultBodyTimeout = 10 * time.Second

// MaxSpawnBytes caps what one Spawn may make: count × the spec's encoded
// size.
const MaxSpawnBytes = 16 << 20

// checkSpawnSize refuses a spawn of n copies of spec over MaxSpawnBytes.
func checkSpawnSize(spec *pb.ProcessSpec, n int) error {
	size := int64(proto.Size(spec))
	if size*int64(n) > MaxSpawnBytes {
		return invalid("count %d × spec of %d bytes is %d bytes, more than one spawn may make (%d MiB): spawn fewer at a time, or a smaller spec",
			n, size, size*int64(n), MaxSpawnBytes>>20)
	}
	return nil
}

// strictJSON is connect's JSON codec refusing unknown fields.
type strictJSON struct{ name string }

func (c strictJSON) Name() string { return c.name }

func (c strictJSON) Marshal(m any) ([]byte, error) {
	pm, ok := m.(proto.Message)
	if !ok {
		return nil, fmt.Errorf("%T is not a proto message", m)
	}
	return protojson.Marshal(pm)
}

func (c strictJSON) Unmarshal(b []byte, m any) error {
	pm, ok := m.(proto.Message)
	if !ok {
		return fmt.Errorf("%T is not a proto message", m)
	}
	if len(b) == 0 {
		return errors.New("empty body: want a JSON object")
	}
	if err := (protojson.UnmarshalOptions{DiscardUnknown: false}).Unmarshal(b, pm); err != nil {
		return fmt.Errorf("request: %w", err)
	}
	return nil
}

// jsonCodecs are the codecs that replace connect's JSON ones.
func jsonCodecs() []connect.HandlerOption {
	return []connect.HandlerOption{connect.WithCodec(strictJSON{"json"}), connect.WithCodec(strictJSON{"json; charset=utf-8"})}
}

// bounded wraps the API with the size and time bounds on bodies.
func (s *Server) bounded(h http.Handler) http.Handler {
	timeout := s.BodyTimeout
	if timeout <= 0 {
		timeout = DefaultBodyTimeout
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.ContentLength > MaxRequestBytes {
			http.Error(w, fmt.Sprintf("request body of %d bytes is more than %d", r.ContentLength, MaxRequestBytes), http.StatusRequestEntityTooLarge)
			return
		}
		if r.URL.Path == StreamPath {
			h.ServeHTTP(w, r)
			return
		}
		rc := http.NewResponseController(w)
		_ = rc.SetReadDeadline(time.Now().Add(timeout))
		bw := &boundedWriter{ResponseWriter: w}
		r.Body = &boundedBody{ReadCloser: r.Body, rc: rc, over: &bw.over, w: w, h1: r.ProtoMajor == 1}
		h.ServeHTTP(bw, r)
	})
}

// boundedBody clears the read deadline once the body has been read, and
// notes a body past MaxRequestBytes.
type boundedBody struct {
	io.ReadCloser
	rc   *http.ResponseController
	n    int64
	over *atomic.Bool
	done bool
	w    http.ResponseWriter
	h1   bool // HTTP/1.x: a cut-off body ends its connection
}

func (b *boundedBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	b.n += int64(n)
	if b.n > MaxRequestBytes {
		b.over.Store(true)
	}
	if err != nil && !b.done {
		b.done = true
		if err == io.EOF {
			_ = b.rc.SetReadDeadline(time.Time{})
		} else if ne := net.Error(nil); errors.As(err, &ne) && ne.Timeout() && b.h1 {
			// The rest of the body would be read as the next request:
			// close the connection after the answer instead.
			b.w.Header().Set("Connection", "close")
		}
	}
	return n, err
}

// boundedWriter answers 413, not connect's 429, to a body past the limit.
type boundedWriter struct {
	http.ResponseWriter
	over atomic.Bool
}

func (w *boundedWriter) WriteHeader(code int) {
	if code == http.StatusTooManyRequests && w.over.Load() {
		code = http.StatusRequestEntityTooLarge
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *boundedWriter) Flush() { _ = http.NewResponseController(w.ResponseWriter).Flush() }

func (w *boundedWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }
