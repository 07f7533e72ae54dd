// Package ui is shimd's web page, the cluster map: plain HTML, CSS and JS
// embedded in the binary and served at /ui/. The page calls the API itself
// (Connect's JSON protocol over fetch, the event stream included) with a
// token the user gives it, so serving it needs no credentials.
package ui

import (
	"embed"
	"io/fs"
	"net/http"
)

//go:embed static
var files embed.FS

// Prefix is where Handler serves the page.
const Prefix = "/ui/"

// Handler serves the page's files under Prefix, and redirects "/" and
// "/ui" there.
func Handler() http.Handler {
	sub, err := fs.Sub(files, "static")
	if err != nil {
		panic(err) // the embedded tree is fixed at build time
	}
	static := http.StripPrefix(Prefix, http.FileServerFS(sub))
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
			return
		}
		switch r.URL.Path {
		case "/", "/ui":
			http.Redirect(w, r, Prefix, http.StatusFound)
			return
		}
		w.Header().Set("Cache-Control", "no-cache")
		w.Header().Set("X-Content-Type-Options", "nosniff")
		w.Header().Set("Content-Security-Policy", "default-src 'self'; frame-ancestors 'none'")
		static.ServeHTTP(w, r)
	})
}

// Mount returns api with the page added: "/", "/ui" and "/ui/..." go to
// Handler, everything else to api.
func Mount(api http.Handler) http.Handler {
	page := Handler()
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p := r.URL.Path
		if p == "/" || p == "/ui" || len(p) >= len(Prefix) && p[:len(Prefix)] == Prefix {
			page.ServeHTTP(w, r)
			return
		}
		api.ServeHTTP(w, r)
	})
}
