package server

import (
	"testing"

	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/table"
)

func TestAutoscaleStep(t *testing.T) {
	svc := &pb.ServiceRecord{Name: "web", Count: 2, Min: 1, Max: 3}
	streak := map[string]int{}
	if _, ok := autoscaleStep(streak, svc, table.ScaleOut); ok {
		t.Fatal("scaled out after one verdict")
	}
	if n, ok := autoscaleStep(streak, svc, table.ScaleOut); !ok || n != 3 {
		t.Fatalf("after two: %d %v, want 3", n, ok)
	}
	// A verdict of 0 breaks a streak.
	for range inAfter - 1 {
		if _, ok := autoscaleStep(streak, svc, table.ScaleIn); ok {
			t.Fatal("scaled in early")
		}
	}
	autoscaleStep(streak, svc, 0)
	for range inAfter - 1 {
		autoscaleStep(streak, svc, table.ScaleIn)
	}
	if n, ok := autoscaleStep(streak, svc, table.ScaleIn); !ok || n != 1 {
		t.Fatalf("scale in: %d %v, want 1", n, ok)
	}
	at := &pb.ServiceRecord{Name: "web", Count: 3, Min: 1, Max: 3}
	for range outAfter + 1 {
		if _, ok := autoscaleStep(streak, at, table.ScaleOut); ok {
			t.Fatal("scaled out past max")
		}
	}
}
