package main

import (
	"math"
	"strconv"
	"unicode/utf8"
)

// jsonWriter appends indented JSON, byte for byte what encoding/json's
// Encoder prints with SetEscapeHTML(false) and a two-space indent. It exists
// for `ps -o json`, whose 100,000-process listing spent most of its time in
// encoding/json's reflection and its second, indenting pass; TestJSONWriter
// holds it to encoding/json's output.
type jsonWriter struct {
	b     []byte
	depth int   // nesting level; a new line is indented 2·depth spaces
	count []int // members written so far, per open object or array
}

func (w *jsonWriter) open(c byte) {
	w.b = append(w.b, c)
	w.depth++
	w.count = append(w.count, 0)
}

func (w *jsonWriter) close(c byte) {
	n := w.count[len(w.count)-1]
	w.count = w.count[:len(w.count)-1]
	w.depth--
	if n > 0 {
		w.newline()
	}
	w.b = append(w.b, c)
}

func (w *jsonWriter) newline() {
	w.b = append(w.b, '\n')
	for range w.depth {
		w.b = append(w.b, ' ', ' ')
	}
}

// elem starts the next member of the innermost object or array.
func (w *jsonWriter) elem() {
	top := len(w.count) - 1
	if w.count[top] > 0 {
		w.b = append(w.b, ',')
	}
	w.count[top]++
	w.newline()
}

func (w *jsonWriter) key(k string) {
	w.elem()
	w.b = appendJSONString(w.b, k)
	w.b = append(w.b, ':', ' ')
}

func (w *jsonWriter) str(k, v string) { w.key(k); w.b = appendJSONString(w.b, v) }
func (w *jsonWriter) int(k string, v int64) {
	w.key(k)
	w.b = strconv.AppendInt(w.b, v, 10)
}
func (w *jsonWriter) uint(k string, v uint64) {
	w.key(k)
	w.b = strconv.AppendUint(w.b, v, 10)
}
func (w *jsonWriter) bool(k string, v bool) { w.key(k); w.b = strconv.AppendBool(w.b, v) }
func (w *jsonWriter) float(k string, v float64) {
	w.key(k)
	w.b = appendJSONFloat(w.b, v)
}

// strPtr writes a string or null.
func (w *jsonWriter) strPtr(k string, v *string) {
	if v == nil {
		w.key(k)
		w.b = append(w.b, "null"...)
		return
	}
	w.str(k, *v)
}

func (w *jsonWriter) stringList(k string, vs []string) {
	w.key(k)
	if vs == nil {
		w.b = append(w.b, "null"...)
		return
	}
	w.open('[')
	for _, v := range vs {
		w.elem()
		w.b = appendJSONString(w.b, v)
	}
	w.close(']')
}

// appendJSONFloat formats as encoding/json does for a float64: shortest
// representation, exponent form outside [1e-6, 1e21), no NaN or infinity
// (the views never hold them).
func appendJSONFloat(b []byte, f float64) []byte {
	format := byte('f')
	if abs := math.Abs(f); abs != 0 && (abs < 1e-6 || abs >= 1e21) {
		format = 'e'
	}
	b = strconv.AppendFloat(b, f, format, -1, 64)
	if format == 'e' { // e-09 → e-9, as encoding/json prints it
		if n := len(b); n >= 4 && b[n-4] == 'e' && b[n-3] == '-' && b[n-2] == '0' {
			b[n-2] = b[n-1]
			b = b[:n-1]
		}
	}
	return b
}

// appendJSONString quotes s as encoding/json does without HTML escaping:
// invalid UTF-8 becomes U+FFFD, and U+2028 and U+2029 are escaped.
func appendJSONString(b []byte, s string) []byte {
	const hex = "0123456789abcdef"
	b = append(b, '"')
	start := 0
	for i := 0; i < len(s); {
		if c := s[i]; c < utf8.RuneSelf {
			if c >= 0x20 && c != '"' && c != '\\' {
				i++
				continue
			}
			b = append(b, s[start:i]...)
			switch c {
			case '"', '\\':
				b = append(b, '\\', c)
			case '\b':
				b = append(b, '\\', 'b')
			case '\f':
				b = append(b, '\\', 'f')
			case '\n':
				b = append(b, '\\', 'n')
			case '\r':
				b = append(b, '\\', 'r')
			case '\t':
				b = append(b, '\\', 't')
			default:
				b = append(b, '\\', 'u', '0', '0', hex[c>>4], hex[c&0xF])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			b = append(b, s[start:i]...)
			b = append(b, `\ufffd`...)
			i += size
			start = i
			continue
		}
		if r == '\u2028' || r == '\u2029' {
			b = append(b, s[start:i]...)
			b = append(b, '\\', 'u', '2', '0', '2', hex[r&0xF])
			i += size
			start = i
			continue
		}
		i += size
	}
	b = append(b, s[start:]...)
	return append(b, '"')
}

// appendProcessJSON appends v as one element of a top-level array (indented
// one level), the layout writeJSON gives a []processJSON.
func appendProcessJSON(b []byte, v *processJSON) []byte {
	w := jsonWriter{b: b, depth: 1}
	w.open('{')
	w.str("id", v.ID)
	w.str("name", v.Name)
	w.str("node", v.Node)
	w.str("state", v.State)
	w.int("pid", v.Pid)
	w.uint("incarnation", v.Incarnation)
	w.uint("restarts", uint64(v.Restarts))
	w.int("exit_code", int64(v.ExitCode))
	w.str("reason", v.Reason)
	w.stringList("command", v.Command)
	w.stringList("env", v.Env)
	w.str("dir", v.Dir)
	w.str("user", v.User)
	w.str("rootfs", v.Rootfs)
	w.str("restart", v.Restart)
	w.str("isolation", v.Isolation)
	w.str("network", v.Network)
	w.str("pinned_node", v.Pinned)
	w.key("resources")
	w.open('{')
	r := &v.Resources
	w.float("cpu_min", r.CPUMin)
	w.float("cpu_max", r.CPUMax)
	w.float("cpu_burst", r.CPUBurst)
	w.int("mem_min", r.MemMin)
	w.int("mem_max", r.MemMax)
	w.int("pids", r.Pids)
	w.close('}')
	w.str("grow", v.Grow)
	w.int("priority", int64(v.Priority))
	w.grant("grant", &v.Grant)
	w.grant("want", v.Want)
	w.str("want_reason", v.WantReason)
	w.key("usage")
	if u := v.Usage; u == nil {
		w.b = append(w.b, "null"...)
	} else {
		w.open('{')
		w.float("cpu", u.CPU)
		w.float("cpu_seconds", u.CPUSeconds)
		w.uint("mem", u.Mem)
		if u.GuestMem != 0 {
			w.int("guest_mem", u.GuestMem)
		}
		w.close('}')
	}
	w.bool("stop", v.Stop)
	w.strPtr("created", v.Created)
	w.strPtr("started", v.Started)
	w.strPtr("finished", v.Finished)
	w.strPtr("updated", v.Updated)
	inc := func(h *incarnationJSON) {
		w.open('{')
		w.uint("incarnation", h.Incarnation)
		w.str("node", h.Node)
		w.int("pid", h.Pid)
		w.str("state", h.State)
		w.int("exit_code", int64(h.ExitCode))
		w.str("reason", h.Reason)
		w.strPtr("started", h.Started)
		w.strPtr("ended", h.Ended)
		w.close('}')
	}
	w.key("history")
	if v.History == nil {
		w.b = append(w.b, "null"...)
	} else {
		w.open('[')
		for i := range v.History {
			w.elem()
			inc(&v.History[i])
		}
		w.close(']')
	}
	w.key("cut_off")
	if v.CutOff == nil {
		w.b = append(w.b, "null"...)
	} else {
		inc(v.CutOff)
	}
	w.uint("modify_index", v.ModifyIndex)
	appendServiceJSON(&w, v) // services.go
	w.close('}')
	return w.b
}
