package pid1

import (
	"bytes"
	"fmt"
	"strconv"
	"strings"
	"syscall"
)

// Report kinds, one line each on the status descriptor: first Started, or
// Failed or NotFound (then the init exits 1); later Exited or Signaled when
// the workload ends (then the init exits too).
const (
	Started  = "started"  // the workload has been executed
	Failed   = "failed"   // setting up or executing failed: Errno (0 if none) and Text say why
	NotFound = "notfound" // Argv[0] (Text) was not found
	Exited   = "exited"   // the workload exited with Code
	Signaled = "signaled" // the workload was killed by signal Code
)

// Report is one line an init writes to its status descriptor.
type Report struct {
	Kind  string
	Code  int           // Exited: exit code; Signaled: signal number
	Errno syscall.Errno // Failed: the error number, 0 if none
	Text  string        // Failed: the message; NotFound: the file
}

// Line encodes r as one line: "kind code errno text\n" (text has no
// newlines).
func (r Report) Line() []byte {
	text := strings.ReplaceAll(r.Text, "\n", " ")
	return []byte(fmt.Sprintf("%s %d %d %s\n", r.Kind, r.Code, int(r.Errno), text))
}

// ParseReport decodes one line made by Line (with or without its newline).
func ParseReport(line []byte) (Report, error) {
	line = bytes.TrimSuffix(line, []byte("\n"))
	f := strings.SplitN(string(line), " ", 4)
	if len(f) != 4 {
		return Report{}, fmt.Errorf("init report %q: malformed", line)
	}
	code, err1 := strconv.Atoi(f[1])
	errno, err2 := strconv.Atoi(f[2])
	if err1 != nil || err2 != nil || errno < 0 {
		return Report{}, fmt.Errorf("init report %q: malformed", line)
	}
	switch f[0] {
	case Started, Failed, NotFound, Exited, Signaled:
	default:
		return Report{}, fmt.Errorf("init report %q: unknown kind", line)
	}
	return Report{Kind: f[0], Code: code, Errno: syscall.Errno(errno), Text: f[3]}, nil
}
