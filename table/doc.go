// Package table is shim's replicated process table: a pure, deterministic state
// machine over process and node records. It makes no I/O, clock or random
// calls; every timestamp and ID arrives inside a command, so each replica that
// applies the same commands holds the same table.
package table
