package main

import (
	"context"
	"fmt"
	"io"
	"text/tabwriter"
	"time"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"

	"github.com/shim-run/shim/auth"
	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/proto/shimv1/shimv1connect"
)

func (a *app) tokenCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "token create|list|revoke",
		Short: "Manage API and join tokens (admin)",
		Long: "Tokens let users and joining nodes in. Roles: admin (everything), operator (spawn,\n" +
			"kill, resize, drain and read; never as root or on a host root filesystem), read\n" +
			"(ps, nodes, logs, metrics) and node (join a node: shimd --join-token). The cluster\n" +
			"keeps only a hash of each token's secret.",
		Args: noArgs,
		RunE: func(cmd *cobra.Command, args []string) error { return cmd.Help() },
	}
	cmd.AddCommand(a.tokenCreateCmd(), a.tokenListCmd(), a.tokenRevokeCmd())
	return cmd
}

var pbTokenRoles = map[auth.Role]pb.TokenRole{
	auth.RoleAdmin:    pb.TokenRole_TOKEN_ROLE_ADMIN,
	auth.RoleOperator: pb.TokenRole_TOKEN_ROLE_OPERATOR,
	auth.RoleRead:     pb.TokenRole_TOKEN_ROLE_READ,
	auth.RoleNode:     pb.TokenRole_TOKEN_ROLE_NODE,
}

func tokenRoleName(r pb.TokenRole) string {
	for name, pr := range pbTokenRoles {
		if pr == r {
			return string(name)
		}
	}
	return "?"
}

func (a *app) tokenCreateCmd() *cobra.Command {
	var role, name string
	var ttl time.Duration
	cmd := &cobra.Command{
		Use:   "create --role admin|operator|read|node [--ttl D] [--name N]",
		Short: "Make a token; it is printed alone on the last line, and only once",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if role == "" {
				return usagef("shim token create needs --role admin, operator, read or node")
			}
			r, err := auth.ParseTokenRole(role)
			if err != nil {
				return flagError("role", role, fmt.Errorf("use admin, operator, read or node"))
			}
			if ttl < 0 {
				return flagError("ttl", ttl.String(), fmt.Errorf("negative"))
			}
			var out *pb.CreateTokenResponse
			err = a.call(cmd.Context(), func(ctx context.Context, c shimv1connect.ShimServiceClient) error {
				resp, err := c.CreateToken(ctx, connect.NewRequest(&pb.CreateTokenRequest{
					Role: pbTokenRoles[r], TtlMillis: ttl.Milliseconds(), Name: name}))
				if err == nil {
					out = resp.Msg
				}
				return err
			})
			if err != nil {
				return err
			}
			rec := out.GetRecord()
			fmt.Fprintf(a.out, "token %s: role %s, expires %s\n", rec.GetId(), tokenRoleName(rec.GetRole()), expiry(rec.GetExpiresUnixNano()))
			fmt.Fprintln(a.out, out.GetToken())
			return nil
		},
	}
	cmd.Flags().StringVar(&role, "role", "", "`ROLE`: admin, operator, read or node (a join token)")
	cmd.Flags().DurationVar(&ttl, "ttl", 0, "expire after `D` (e.g. 24h; default never)")
	cmd.Flags().StringVar(&name, "name", "", "what the token is for (shown by token list)")
	return cmd
}

func expiry(ns int64) string {
	if ns == 0 {
		return "never"
	}
	return time.Unix(0, ns).UTC().Format(time.RFC3339)
}

type tokenJSON struct {
	ID      string `json:"id"`
	Role    string `json:"role"`
	Name    string `json:"name"`
	Created string `json:"created"`
	Expires string `json:"expires"`
}

func (a *app) tokenListCmd() *cobra.Command {
	var output string
	cmd := &cobra.Command{
		Use:   "list [-o table|json]",
		Short: "List tokens: id, role, name, expiry (never the secret)",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := outputFormat(output, "table", "json"); err != nil {
				return err
			}
			var toks []*pb.TokenRecord
			err := a.call(cmd.Context(), func(ctx context.Context, c shimv1connect.ShimServiceClient) error {
				resp, err := c.ListTokens(ctx, connect.NewRequest(&pb.ListTokensRequest{}))
				if err == nil {
					toks = resp.Msg.GetTokens()
				}
				return err
			})
			if err != nil {
				return err
			}
			views := make([]tokenJSON, 0, len(toks))
			for _, t := range toks {
				views = append(views, tokenJSON{ID: t.GetId(), Role: tokenRoleName(t.GetRole()), Name: t.GetName(),
					Created: time.Unix(0, t.GetCreatedUnixNano()).UTC().Format(time.RFC3339), Expires: expiry(t.GetExpiresUnixNano())})
			}
			if output == "json" {
				return writeJSON(a.out, views)
			}
			return writeTokenTable(a.out, views, a.now())
		},
	}
	cmd.Flags().StringVarP(&output, "output", "o", "table", "output `FORMAT`: table or json")
	return cmd
}

func writeTokenTable(w io.Writer, toks []tokenJSON, now time.Time) error {
	tw := tabwriter.NewWriter(w, 0, 8, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tROLE\tEXPIRES\tCREATED\tNAME")
	for _, t := range toks {
		exp := t.Expires
		if e, err := time.Parse(time.RFC3339, exp); err == nil && !e.After(now) {
			exp += " (expired)"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", t.ID, t.Role, exp, t.Created, dash(cell(t.Name)))
	}
	return tw.Flush()
}

func (a *app) tokenRevokeCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "revoke ID",
		Short: "End a token at once (its id, as token list shows it)",
		Args:  exactArgs(1, "one token id"),
		RunE: func(cmd *cobra.Command, args []string) error {
			id := args[0]
			if tok, err := auth.ParseToken(id); err == nil {
				id = tok.ID // a whole token: revoke it by its id
			} else if err := auth.ValidTokenID(id); err != nil {
				return usagef("shim token revoke %q: %v", id, err)
			}
			err := a.call(cmd.Context(), func(ctx context.Context, c shimv1connect.ShimServiceClient) error {
				_, err := c.RevokeToken(ctx, connect.NewRequest(&pb.RevokeTokenRequest{Id: id}))
				return err
			})
			if err != nil {
				return err
			}
			fmt.Fprintln(a.out, id)
			return nil
		},
	}
}
