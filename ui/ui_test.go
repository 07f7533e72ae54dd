package ui

import (
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

func TestMount(t *testing.T) {
	api := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusTeapot) })
	h := Mount(api)
	for _, c := range []struct {
		method, path string
		code         int
		body         string
	}{
		{"GET", "/", http.StatusFound, ""},
		{"GET", "/ui", http.StatusFound, ""},
		{"GET", "/ui/", http.StatusOK, "<title>shim"},
		{"GET", "/ui/app.js", http.StatusOK, "Events"},
		{"GET", "/ui/app.css", http.StatusOK, ".node"},
		{"GET", "/ui/nope.js", http.StatusNotFound, ""},
		{"POST", "/ui/", http.StatusMethodNotAllowed, ""},
		{"POST", "/shim.v1.ShimService/Nodes", http.StatusTeapot, ""},
		{"GET", "/uix", http.StatusTeapot, ""},
	} {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest(c.method, c.path, nil))
		if rec.Code != c.code {
			t.Errorf("%s %s: %d, want %d", c.method, c.path, rec.Code, c.code)
		}
		if c.body != "" && !strings.Contains(rec.Body.String(), c.body) {
			t.Errorf("%s %s: body lacks %q", c.method, c.path, c.body)
		}
	}
}
