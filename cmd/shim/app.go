package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"

	"github.com/shim-run/shim/client"
	"github.com/shim-run/shim/proto/shimv1/shimv1connect"
	"github.com/shim-run/shim/table"
)

const defaultAddr = "127.0.0.1:7070"

// app holds one invocation's settings and clients.
type app struct {
	out, errOut io.Writer
	getenv      func(string) string
	now         func() time.Time
	// dial makes a client for a base URL ("https://host:port"); tests
	// replace it.
	dial func(baseURL string) (shimv1connect.ShimServiceClient, error)

	addrFlag, tokenFlag, caFlag string
	timeout                     time.Duration
	stale                       bool         // reads answer from the member's own copy (stale.go)
	creds                       *credentials // found on first use (creds.go)
	// newRequestID makes a spawn's request id (retry.go); tests replace it.
	newRequestID func() string

	addrs []string       // resolved on first use
	cl    *client.Client // made on first use (client.go)
}

func newApp(out, errOut io.Writer) *app {
	a := &app{out: out, errOut: errOut, getenv: os.Getenv, now: time.Now, newRequestID: newRequestID}
	a.dial = a.httpDial
	return a
}

// usageError is a mistake on the command line; it exits 2.
type usageError struct{ msg string }

func (e *usageError) Error() string { return e.msg }

func usagef(format string, args ...any) error {
	return &usageError{fmt.Sprintf(format, args...)}
}

// flagError reports a bad flag value: invalid --mem "12X": unknown unit ...
func flagError(flag, value string, err error) error {
	return usagef("invalid --%s %q: %v", flag, value, err)
}

// execute runs the command line and returns the exit code.
func (a *app) execute(ctx context.Context, args []string) int {
	root := a.rootCmd()
	root.SetArgs(args)
	root.SetOut(a.out)
	root.SetErr(a.errOut)
	err := root.ExecuteContext(ctx)
	if err == nil {
		return 0
	}
	if x := (*exitError)(nil); errors.As(err, &x) {
		return x.code // shim exec: the remote command's code, said nothing (exec.go)
	}
	fmt.Fprintln(a.errOut, "shim: "+errorLine(err))
	return exitCode(err)
}

// exitCode is 2 for usage errors and 1 for everything else.
func exitCode(err error) int {
	var u *usageError
	if errors.As(err, &u) {
		return 2
	}
	return 1
}

// errorLine renders err as a single line without a "shim: " prefix. Connect
// errors show only their message, without the code.
func errorLine(err error) string {
	var msg string
	var ce *connect.Error
	if errors.As(err, &ce) && err == error(ce) {
		msg = serverMessage(ce)
	} else {
		msg = err.Error()
	}
	return strings.Join(strings.Fields(msg), " ")
}

// serverMessage is a connect error's message, minus the table's "not found: "
// sentinel prefix, so an unknown ID reads `no process "xyz"`.
func serverMessage(ce *connect.Error) string {
	msg := ce.Message()
	if msg == "" {
		msg = ce.Code().String()
	}
	return strings.TrimPrefix(msg, table.ErrNotFound.Error()+": ")
}

// srvErr turns an RPC error into a plain error carrying the server's message.
func srvErr(err error) error {
	var ce *connect.Error
	if errors.As(err, &ce) && err == error(ce) {
		return errors.New(serverMessage(ce))
	}
	return err
}

func (a *app) rootCmd() *cobra.Command {
	root := &cobra.Command{
		Use:   "shim",
		Short: "Command-line client for a shim cluster",
		Long: "shim talks to a shim cluster: it spawns, lists, resizes and kills processes,\n" +
			"streams their logs, and shows and drains nodes.",
		SilenceUsage:      true,
		SilenceErrors:     true,
		CompletionOptions: cobra.CompletionOptions{DisableDefaultCmd: true},
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) == 0 {
				return nil
			}
			msg := fmt.Sprintf("unknown command %q for \"shim\"", args[0])
			if s := cmd.SuggestionsFor(args[0]); len(s) > 0 {
				msg += " (did you mean " + strings.Join(s, ", ") + "?)"
			}
			return &usageError{msg}
		},
		RunE: func(cmd *cobra.Command, args []string) error { return cmd.Help() },
	}
	root.SuggestionsMinimumDistance = 2
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error {
		return &usageError{err.Error()}
	})
	pf := root.PersistentFlags()
	pf.StringVar(&a.addrFlag, "addr", "", "shim servers `ADDR[,ADDR]`, tried in order (default $SHIM_ADDR or "+defaultAddr+")")
	pf.DurationVar(&a.timeout, "timeout", 10*time.Second, "timeout of each API call (0: none)")
	pf.StringVar(&a.tokenFlag, "token", "", "API token (default $SHIM_TOKEN, or admin.token in $SHIM_DATA_DIR, default ./shim-data)")
	pf.StringVar(&a.caFlag, "ca", "", "cluster CA certificate, a PEM `FILE` (default $SHIM_CA, or ca.pem in $SHIM_DATA_DIR)")
	pf.BoolVar(&a.stale, "stale", false, "ps, nodes, top: answer from the member's own copy of the table, which may be behind (-o json says how far)")
	root.PersistentPreRunE = func(cmd *cobra.Command, args []string) error {
		if a.timeout < 0 {
			return usagef("invalid --timeout %s: negative", a.timeout)
		}
		return nil
	}
	root.AddCommand(
		a.spawnCmd(), a.psCmd(), a.killCmd(), a.nodesCmd(), a.logsCmd(),
		a.resizeCmd(), a.drainCmd(false), a.drainCmd(true), a.topCmd(), a.tokenCmd(), a.versionCmd(),
		a.grantCmd(), a.eventsCmd(), // grow.go
		a.scaleCmd(), a.endpointsCmd(), a.servicesCmd(), a.updateCmd(), a.execCmd(), // services.go, update.go, exec.go
		a.nodeCmd(), a.completionCmd(), // node.go, completion.go
	)
	return root
}

// noArgs, exactArgs and minArgs are cobra.PositionalArgs that fail as usage errors.
func noArgs(cmd *cobra.Command, args []string) error {
	if len(args) > 0 {
		return usagef("%s takes no arguments, got %q", cmd.CommandPath(), args[0])
	}
	return nil
}

func exactArgs(n int, what string) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error {
		if len(args) != n {
			return usagef("%s needs %s (usage: %s)", cmd.CommandPath(), what, usageLine(cmd))
		}
		return nil
	}
}

func minArgs(n int, what string) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error {
		if len(args) < n {
			return usagef("%s needs %s (usage: %s)", cmd.CommandPath(), what, usageLine(cmd))
		}
		return nil
	}
}

// outputFormat checks an -o value against the allowed formats.
func outputFormat(v string, allowed ...string) error {
	for _, f := range allowed {
		if v == f {
			return nil
		}
	}
	return flagError("output", v, fmt.Errorf("use %s", strings.Join(allowed, ", ")))
}

func usageLine(cmd *cobra.Command) string {
	if cmd.HasParent() {
		return cmd.Parent().CommandPath() + " " + cmd.Use
	}
	return cmd.Use
}
