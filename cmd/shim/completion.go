package main

import (
	"github.com/spf13/cobra"
)

// shim completion bash|zsh|fish: cobra's completion scripts.

func (a *app) completionCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "completion bash|zsh|fish",
		Short: "Print a shell completion script",
		Long: "Print the completion script of a shell. Load it in the running shell with\n" +
			"  source <(shim completion bash)        # bash (needs bash-completion)\n" +
			"  source <(shim completion zsh)         # zsh\n" +
			"  shim completion fish | source         # fish\n" +
			"or install it where the shell looks, e.g. shim completion bash >/etc/bash_completion.d/shim.",
		ValidArgs: []string{"bash", "zsh", "fish"},
		Args:      exactArgs(1, "a shell: bash, zsh or fish"),
		RunE: func(cmd *cobra.Command, args []string) error {
			root := cmd.Root()
			switch args[0] {
			case "bash":
				return root.GenBashCompletionV2(a.out, true)
			case "zsh":
				return root.GenZshCompletion(a.out)
			case "fish":
				return root.GenFishCompletion(a.out, true)
			}
			return usagef("unknown shell %q: use bash, zsh or fish", args[0])
		},
	}
}
