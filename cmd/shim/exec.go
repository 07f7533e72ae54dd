package main

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/shim-run/shim/client"
	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/proto/shimv1/shimv1connect"
)

// stdin is what exec -i reads.
func (a *app) stdin() io.Reader { return os.Stdin }

// exitError makes the CLI exit with a remote command's code.
type exitError struct{ code int }

func (e *exitError) Error() string { return "" }

func (a *app) execCmd() *cobra.Command {
	var interactive, tty bool
	cmd := &cobra.Command{
		Use:   "exec [-i] [-t] ID|NAME -- CMD [ARG...]",
		Short: "Run a command inside a running process's sandbox",
		Long: "Run a command inside a running process's sandbox: its namespaces, root, working\n" +
			"directory, cgroups, user and environment. NAME may be a service (its lowest running\n" +
			"replica). -i passes stdin, -t runs it on a terminal; shim exits with its exit code.",
		Example: "  shim exec web -- cat /proc/1/cmdline\n  shim exec -it web -- /bin/sh",
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) < 2 {
				return usagef("exec needs a process and a command (usage: %s)", usageLine(cmd))
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.exec(cmd.Context(), args[0], args[1:], interactive, tty)
		},
	}
	cmd.Flags().BoolVarP(&interactive, "interactive", "i", false, "pass stdin to the command")
	cmd.Flags().BoolVarP(&tty, "tty", "t", false, "run the command on a terminal")
	return cmd
}

// execClient is a client that speaks HTTP/2 (a bidirectional stream needs it).
func (a *app) execClient(baseURL string) (shimv1connect.ShimServiceClient, error) {
	cr, err := a.credentials(strings.HasPrefix(baseURL, "https://"))
	if err != nil {
		return nil, err
	}
	if cr.tls == nil {
		return nil, usagef("exec needs TLS (an https:// address)")
	}
	tr := &http.Transport{
		DialContext:         (&net.Dialer{Timeout: 3 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		TLSClientConfig:     cr.tls.Clone(),
		TLSHandshakeTimeout: 3 * time.Second,
		ForceAttemptHTTP2:   true,
	}
	return shimv1connect.NewShimServiceClient(&http.Client{Transport: tr}, baseURL, client.Bearer(cr.token)), nil
}

func (a *app) exec(ctx context.Context, ref string, argv []string, interactive, tty bool) error {
	if err := a.resolve(); err != nil {
		return err
	}
	start := &pb.ExecStart{Id: ref, Command: argv, Tty: tty}
	in, isFile := a.stdin().(*os.File)
	if tty && isFile && term.IsTerminal(int(in.Fd())) {
		if w, h, err := term.GetSize(int(in.Fd())); err == nil {
			start.Size = &pb.TermSize{Rows: uint32(h), Cols: uint32(w)}
		}
		if interactive {
			old, err := term.MakeRaw(int(in.Fd()))
			if err == nil {
				defer term.Restore(int(in.Fd()), old)
			}
		}
	}
	var last error
	for _, addr := range a.addrs {
		c, err := a.execClient(addr)
		if err != nil {
			return err
		}
		code, started, err := a.execOn(ctx, c, start, interactive)
		if err == nil {
			if code != 0 {
				return &exitError{code}
			}
			return nil
		}
		if started || !unreachable(err) {
			return srvErr(err)
		}
		last = err
	}
	return &client.UnreachableError{Addrs: a.addrs, Err: last}
}

// execOn runs the exec through one member; started says whether the
// command began (then it is not tried elsewhere).
func (a *app) execOn(ctx context.Context, c shimv1connect.ShimServiceClient, start *pb.ExecStart, interactive bool) (int, bool, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	s := c.Exec(ctx)
	if err := s.Send(&pb.ExecInput{Start: start}); err != nil {
		if _, rerr := s.Receive(); rerr != nil && !errors.Is(rerr, io.EOF) {
			return 0, false, rerr
		}
		return 0, false, err
	}
	if !interactive {
		_ = s.Send(&pb.ExecInput{StdinEof: true})
	}
	started := false
	for {
		out, err := s.Receive()
		if err != nil {
			if errors.Is(err, io.EOF) {
				return 0, started, errors.New("the exec stream ended without an exit code")
			}
			return 0, started, err
		}
		if !started {
			started = true
			if interactive {
				go a.pumpStdin(s)
			}
			if start.Tty {
				go a.pumpResize(ctx, s)
			}
		}
		if len(out.Stdout) > 0 {
			_, _ = a.out.Write(out.Stdout)
		}
		if len(out.Stderr) > 0 {
			_, _ = a.errOut.Write(out.Stderr)
		}
		if out.Exited {
			_ = s.CloseRequest()
			return int(out.ExitCode), true, nil
		}
	}
}

func (a *app) pumpStdin(s *connect.BidiStreamForClient[pb.ExecInput, pb.ExecOutput]) {
	buf := make([]byte, 32<<10)
	for {
		n, err := a.stdin().Read(buf)
		if n > 0 {
			if s.Send(&pb.ExecInput{Stdin: append([]byte(nil), buf[:n]...)}) != nil {
				return
			}
		}
		if err != nil {
			_ = s.Send(&pb.ExecInput{StdinEof: true})
			return
		}
	}
}

// pumpResize sends the terminal's new size on SIGWINCH.
func (a *app) pumpResize(ctx context.Context, s *connect.BidiStreamForClient[pb.ExecInput, pb.ExecOutput]) {
	f, ok := a.stdin().(*os.File)
	if !ok {
		return
	}
	ch := make(chan os.Signal, 1)
	signal.Notify(ch, syscall.SIGWINCH)
	defer signal.Stop(ch)
	for {
		select {
		case <-ctx.Done():
			return
		case <-ch:
			if w, h, err := term.GetSize(int(f.Fd())); err == nil {
				_ = s.Send(&pb.ExecInput{Resize: &pb.TermSize{Rows: uint32(h), Cols: uint32(w)}})
			}
		}
	}
}
