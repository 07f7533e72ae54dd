package raftlog

import (
	"context"
	"fmt"
	"io"
	"path/filepath"
	"runtime"
	"sync/atomic"
	"testing"
	"time"
)

// countFSM is a minimal FSM for benchmarks.
type countFSM struct{ n atomic.Uint64 }

func (f *countFSM) Apply(uint64, []byte) any    { return f.n.Add(1) }
func (f *countFSM) Snapshot() (Snapshot, error) { return kvSnap{}, nil }
func (f *countFSM) Restore(r io.Reader) error   { _, err := io.Copy(io.Discard, r); return err }

// diskCluster opens size on-disk TCP nodes (BoltDB with fsync) and returns the leader.
func diskCluster(b *testing.B, size int) *Node {
	b.Helper()
	ctx := context.Background()
	var nodes []*Node
	for i := range size {
		n, err := Open(Config{
			ID:        fmt.Sprintf("b%d", i),
			BindAddr:  "127.0.0.1:0",
			DataDir:   filepath.Join(b.TempDir(), fmt.Sprint(i)),
			Bootstrap: i == 0,
			Logger:    testLog(),
		}, &countFSM{})
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { n.Shutdown() })
		nodes = append(nodes, n)
		if i == 0 {
			waitLeader(b, n)
		} else if err := nodes[0].AddVoter(ctx, n.ID(), n.Addr()); err != nil {
			b.Fatal(err)
		}
	}
	return waitLeader(b, nodes...)
}

func benchApply(b *testing.B, size, goroutines int) {
	leader := diskCluster(b, size)
	// A cancellable ctx with a deadline, as real callers pass.
	ctx, cancel := context.WithTimeout(context.Background(), time.Hour)
	defer cancel()
	payload := make([]byte, 128)
	b.ReportAllocs()
	b.ResetTimer()
	if goroutines <= 1 {
		for b.Loop() {
			if _, _, err := leader.Apply(ctx, payload); err != nil {
				b.Fatal(err)
			}
		}
	} else {
		b.SetParallelism((goroutines + runtime.GOMAXPROCS(0) - 1) / runtime.GOMAXPROCS(0))
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				if _, _, err := leader.Apply(ctx, payload); err != nil {
					b.Error(err)
					return
				}
			}
		})
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "applies/s")
}

// BenchmarkApply: one goroutine, single on-disk node; every Apply waits for
// its own fsync.
func BenchmarkApply(b *testing.B) { benchApply(b, 1, 1) }

// BenchmarkApplyParallel: 64 concurrent goroutines on a single on-disk node;
// raft group-commits them into shared fsyncs.
func BenchmarkApplyParallel(b *testing.B) { benchApply(b, 1, 64) }

// BenchmarkApply3Node / BenchmarkApplyParallel3Node: the same against a
// 3-voter on-disk cluster over loopback TCP.
func BenchmarkApply3Node(b *testing.B)         { benchApply(b, 3, 1) }
func BenchmarkApplyParallel3Node(b *testing.B) { benchApply(b, 3, 64) }
