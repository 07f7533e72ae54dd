// Command hog is a test workload for exec/vm: it allocates memory step by
// step, touching every page, and reports how far it got.
//
//	hog TOTAL_MIB STEP_MIB PAUSE_MS
package main

import (
	"fmt"
	"os"
	"strconv"
	"time"
)

func main() {
	if len(os.Args) != 4 {
		fmt.Fprintln(os.Stderr, "usage: hog TOTAL_MIB STEP_MIB PAUSE_MS")
		os.Exit(2)
	}
	total, err1 := strconv.Atoi(os.Args[1])
	step, err2 := strconv.Atoi(os.Args[2])
	pause, err3 := strconv.Atoi(os.Args[3])
	if err1 != nil || err2 != nil || err3 != nil || total <= 0 || step <= 0 || pause < 0 {
		fmt.Fprintln(os.Stderr, "hog: bad arguments")
		os.Exit(2)
	}
	var keep [][]byte
	for got := 0; got < total; got += step {
		b := make([]byte, step<<20)
		for i := 0; i < len(b); i += 4096 {
			b[i] = 1
		}
		keep = append(keep, b)
		if (got+step)%64 < step {
			fmt.Println("hog", got+step, "MiB")
		}
		time.Sleep(time.Duration(pause) * time.Millisecond)
	}
	fmt.Println("survived", len(keep)*step, "MiB")
}
