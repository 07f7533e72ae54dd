package main

import (
	"strings"
	"testing"
)

func TestParseHostPaths(t *testing.T) {
	dir := t.TempDir()
	paths, recs, err := parseHostPaths([]string{"data=" + dir, "images=" + dir + ":ro", "scratch=" + dir + ":rw"})
	if err != nil {
		t.Fatal(err)
	}
	if len(paths) != 3 || paths["images"].Path != dir || !paths["images"].ReadOnly || paths["data"].ReadOnly || paths["scratch"].ReadOnly {
		t.Errorf("paths %v", paths)
	}
	if len(recs) != 3 || recs[0].Name != "data" || recs[1].Name != "images" || !recs[1].ReadOnly {
		t.Errorf("records %v", recs)
	}
	for _, c := range []struct{ flag, want string }{
		{"data", "the name is"},
		{"=" + dir, "the name is"},
		{"a/b=" + dir, "the name is"},
		{"data=relative", "absolute, clean"},
		{"data=/", "other than /"},
		{"data=" + dir + "/../x", "absolute, clean"},
		{"data=" + dir + "/missing", "not a directory"},
	} {
		_, _, err := parseHostPaths([]string{c.flag})
		if err == nil || !strings.Contains(err.Error(), c.want) || !strings.HasPrefix(err.Error(), "--host-path ") {
			t.Errorf("--host-path %s: %v, want one line with %q", c.flag, err, c.want)
		}
	}
	if _, _, err := parseHostPaths([]string{"data=" + dir, "data=" + dir + ":ro"}); err == nil || !strings.Contains(err.Error(), "twice") {
		t.Errorf("a name declared twice: %v", err)
	}
}

func TestVMUserAndGrant(t *testing.T) {
	for in, want := range map[string]string{"": "65534:65534", "0": "0", "1000:100": "1000:100"} {
		if u, _, _, err := vmUser(in); err != nil || u != want {
			t.Errorf("vmUser(%q) = %q, %v; want %q", in, u, err, want)
		}
	}
	if _, _, _, err := vmUser("nobody"); err == nil {
		t.Error("vmUser(nobody): no error")
	}
}
