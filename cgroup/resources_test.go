package cgroup

import (
	"errors"
	"slices"
	"testing"
)

func TestMapV1(t *testing.T) {
	for _, tc := range []struct {
		name string
		in   Resources
		want V1
	}{
		{"unset", Resources{}, V1{CPUShares: 2, CPUCfsPeriodUs: 100000, CPUCfsQuotaUs: -1, MemoryLimit: -1, MemorySoftLimit: -1, PidsMax: -1}},
		{"one core", Resources{CPUMinMilli: 1000, CPUMaxMilli: 1000},
			V1{CPUShares: 1024, CPUCfsPeriodUs: 100000, CPUCfsQuotaUs: 100000, MemoryLimit: -1, MemorySoftLimit: -1, PidsMax: -1}},
		{"fractional", Resources{CPUMinMilli: 250, CPUMaxMilli: 500, CPUBurstMilli: 200},
			V1{CPUShares: 256, CPUCfsPeriodUs: 100000, CPUCfsQuotaUs: 50000, CPUCfsBurstUs: 20000, MemoryLimit: -1, MemorySoftLimit: -1, PidsMax: -1}},
		{"tiny min clamps to 2 shares", Resources{CPUMinMilli: 1},
			V1{CPUShares: 2, CPUCfsPeriodUs: 100000, CPUCfsQuotaUs: -1, MemoryLimit: -1, MemorySoftLimit: -1, PidsMax: -1}},
		{"huge min clamps to max shares", Resources{CPUMinMilli: 1 << 40},
			V1{CPUShares: 262144, CPUCfsPeriodUs: 100000, CPUCfsQuotaUs: -1, MemoryLimit: -1, MemorySoftLimit: -1, PidsMax: -1}},
		{"tiny max clamps to 1ms quota", Resources{CPUMaxMilli: 5},
			V1{CPUShares: 2, CPUCfsPeriodUs: 100000, CPUCfsQuotaUs: 1000, MemoryLimit: -1, MemorySoftLimit: -1, PidsMax: -1}},
		{"multi core", Resources{CPUMinMilli: 2500, CPUMaxMilli: 4000, CPUBurstMilli: 1000},
			V1{CPUShares: 2560, CPUCfsPeriodUs: 100000, CPUCfsQuotaUs: 400000, CPUCfsBurstUs: 100000, MemoryLimit: -1, MemorySoftLimit: -1, PidsMax: -1}},
		{"burst clamped to quota", Resources{CPUMaxMilli: 100, CPUBurstMilli: 500},
			V1{CPUShares: 2, CPUCfsPeriodUs: 100000, CPUCfsQuotaUs: 10000, CPUCfsBurstUs: 10000, MemoryLimit: -1, MemorySoftLimit: -1, PidsMax: -1}},
		{"burst without max is dropped", Resources{CPUBurstMilli: 500},
			V1{CPUShares: 2, CPUCfsPeriodUs: 100000, CPUCfsQuotaUs: -1, MemoryLimit: -1, MemorySoftLimit: -1, PidsMax: -1}},
		{"memory and pids", Resources{MemMinBytes: 64 << 20, MemMaxBytes: 128 << 20, PidsMax: 32},
			V1{CPUShares: 2, CPUCfsPeriodUs: 100000, CPUCfsQuotaUs: -1, MemoryLimit: 128 << 20, MemorySoftLimit: 64 << 20, PidsMax: 32}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := MapV1(tc.in); got != tc.want {
				t.Errorf("MapV1(%+v)\n got %+v\nwant %+v", tc.in, got, tc.want)
			}
		})
	}
}

func TestMapV2(t *testing.T) {
	for _, tc := range []struct {
		name string
		in   Resources
		want V2
	}{
		{"unset", Resources{}, V2{CPUWeight: 1, CPUMax: "max 100000", MemoryMax: "max", PidsMax: "max"}},
		{"one core", Resources{CPUMinMilli: 1000, CPUMaxMilli: 1000},
			V2{CPUWeight: 100, CPUMax: "100000 100000", MemoryMax: "max", PidsMax: "max"}},
		{"fractional", Resources{CPUMinMilli: 250, CPUMaxMilli: 500, CPUBurstMilli: 200},
			V2{CPUWeight: 25, CPUMax: "50000 100000", CPUMaxBurst: 20000, MemoryMax: "max", PidsMax: "max"}},
		{"tiny min clamps to weight 1", Resources{CPUMinMilli: 5},
			V2{CPUWeight: 1, CPUMax: "max 100000", MemoryMax: "max", PidsMax: "max"}},
		{"huge min clamps to 10000", Resources{CPUMinMilli: 200000},
			V2{CPUWeight: 10000, CPUMax: "max 100000", MemoryMax: "max", PidsMax: "max"}},
		{"tiny max clamps to 1ms quota", Resources{CPUMaxMilli: 1},
			V2{CPUWeight: 1, CPUMax: "1000 100000", MemoryMax: "max", PidsMax: "max"}},
		{"burst clamped to quota", Resources{CPUMaxMilli: 300, CPUBurstMilli: 2000},
			V2{CPUWeight: 1, CPUMax: "30000 100000", CPUMaxBurst: 30000, MemoryMax: "max", PidsMax: "max"}},
		{"burst without max is dropped", Resources{CPUBurstMilli: 500},
			V2{CPUWeight: 1, CPUMax: "max 100000", MemoryMax: "max", PidsMax: "max"}},
		{"memory and pids", Resources{MemMinBytes: 1 << 20, MemMaxBytes: 1 << 30, PidsMax: 100},
			V2{CPUWeight: 1, CPUMax: "max 100000", MemoryMin: 1 << 20, MemoryMax: "1073741824", PidsMax: "100"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := MapV2(tc.in); got != tc.want {
				t.Errorf("MapV2(%+v)\n got %+v\nwant %+v", tc.in, got, tc.want)
			}
		})
	}
}

func TestValidate(t *testing.T) {
	if err := (Resources{CPUMaxMilli: 1, PidsMax: 3}).Validate(); err != nil {
		t.Fatalf("valid resources: %v", err)
	}
	err := Resources{MemMaxBytes: -1}.Validate()
	if !errors.Is(err, ErrInvalid) {
		t.Fatalf("negative MemMaxBytes: got %v, want ErrInvalid", err)
	}
}

// TestPlanV2 checks which v2 files an update writes, in which order, and
// which go through cgroup2 (lib) rather than directly.
func TestPlanV2(t *testing.T) {
	type w struct {
		file, val string
		lib       bool
	}
	full := Resources{CPUMinMilli: 500, CPUMaxMilli: 1000, CPUBurstMilli: 200, MemMinBytes: 1 << 20, MemMaxBytes: 1 << 30, PidsMax: 100}
	fresh := v2New
	limited := MapV2(full)
	for _, tc := range []struct {
		name string
		r    Resources
		prev *V2
		want []w
	}{
		{"create with every bound", full, &fresh, []w{
			{"cpu.weight", "50", true}, {"cpu.max", "100000 100000", true}, {"cpu.max.burst", "20000", false},
			{"memory.min", "1048576", true}, {"memory.max", "1073741824", true}, {"pids.max", "100", true}}},
		{"create with none: only the weight of no minimum", Resources{}, &fresh, []w{{"cpu.weight", "1", true}}},
		{"unchanged", full, &limited, nil},
		{"quota below the burst: burst dropped first", Resources{CPUMinMilli: 500, CPUMaxMilli: 100, CPUBurstMilli: 50, MemMinBytes: 1 << 20, MemMaxBytes: 1 << 30, PidsMax: 100}, &limited, []w{
			{"cpu.max.burst", "0", false}, {"cpu.max", "10000 100000", true}, {"cpu.max.burst", "5000", false}}},
		{"lift everything", Resources{}, &limited, []w{
			{"cpu.weight", "1", true}, {"cpu.max.burst", "0", false}, {"cpu.max", "max 100000", true},
			{"memory.min", "0", true}, {"memory.max", "max", false}, {"pids.max", "max", true}}},
		{"unknown: every file", Resources{PidsMax: 3}, nil, []w{
			{"cpu.weight", "1", true}, {"cpu.max.burst", "0", false}, {"cpu.max", "max 100000", true},
			{"memory.min", "0", true}, {"memory.max", "max", false}, {"pids.max", "3", true}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var got []w
			for _, x := range planV2(tc.r, tc.prev) {
				got = append(got, w{x.file, x.val, x.res != nil})
			}
			if !slices.Equal(got, tc.want) {
				t.Errorf("planV2\n got %v\nwant %v", got, tc.want)
			}
		})
	}
}
