package main

import (
	"strings"
	"testing"
	"time"
)

func TestGrowFlags(t *testing.T) {
	o := growOptions{interval: 100 * time.Millisecond, memShrinkAfter: 5 * time.Second, cpuShrinkAfter: time.Minute}
	p, err := o.policy()
	if err != nil || p.MemShrinkAfter != 5*time.Second || p.CPUShrinkAfter != time.Minute || p.MemShrinkBelow != memShrinkBelow {
		t.Fatalf("policy %+v, %v", p, err)
	}
	for _, c := range []struct {
		o    growOptions
		want string
	}{
		{growOptions{interval: time.Millisecond, memShrinkAfter: time.Second}, "--grow-interval 1ms: use 10ms to 10s"},
		{growOptions{interval: time.Minute}, "--grow-interval 1m0s: use 10ms to 10s"},
		{growOptions{interval: time.Second, memShrinkAfter: -time.Second}, "memory shrink-after -1s is negative"},
	} {
		if _, err := c.o.policy(); err == nil || !strings.Contains(err.Error(), c.want) || strings.Contains(err.Error(), "\n") {
			t.Errorf("%+v: %v, want one line with %q", c.o, err, c.want)
		}
	}
}
