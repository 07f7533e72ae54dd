package auth

import (
	"errors"
	"strings"
	"testing"
)

func TestTokenRoundTrip(t *testing.T) {
	tok := NewToken("")
	s := tok.String()
	if len(s) != idLen+1+secretLen || strings.Count(s, ".") != 1 {
		t.Fatalf("token %q", s)
	}
	back, err := ParseToken("  " + s + "\n")
	if err != nil || back != tok {
		t.Fatalf("parse %q: %+v, %v", s, back, err)
	}
	if !back.Matches(tok.Hash()) {
		t.Error("a token does not match its own hash")
	}
	other := NewToken("")
	if other.ID == tok.ID || other.Matches(tok.Hash()) {
		t.Error("two tokens alike")
	}
	if len(tok.Hash()) != 32 || strings.Contains(string(tok.Hash()), tok.Secret) {
		t.Error("hash is not a sha256 of the secret")
	}
}

func TestJoinTokenCarriesPin(t *testing.T) {
	c := newTestCluster(t)
	tok := NewToken(c.ca.Pin())
	s := tok.String()
	if !strings.HasPrefix(s, "SHIM1"+c.ca.Pin()+"::") {
		t.Fatalf("join token %q", s)
	}
	back, err := ParseToken(s)
	if err != nil || back != tok || back.Pin != c.ca.Pin() {
		t.Fatalf("parse: %+v, %v", back, err)
	}
}

func TestParseTokenRefuses(t *testing.T) {
	good := NewToken("")
	pin := strings.Repeat("a", 64)
	for _, s := range []string{
		"", "abc", good.ID, good.ID + ".", "." + good.Secret,
		good.ID + "x." + good.Secret,                 // id too long
		strings.ToUpper(good.ID) + "." + good.Secret, // not lower-case hex
		good.ID + "." + good.Secret + "0",            // secret too long
		good.ID + ":" + good.Secret,
		"SHIM1" + good.String(),                   // no pin
		"SHIM1" + pin[:63] + "::" + good.String(), // short pin
		"SHIM1" + pin + ":" + good.String(),
		"SHIM1" + strings.Repeat("g", 64) + "::" + good.String(),
	} {
		_, err := ParseToken(s)
		if !errors.Is(err, ErrToken) {
			t.Errorf("ParseToken(%q) = %v", s, err)
		}
		if err != nil && len(s) > 20 && strings.Contains(err.Error(), good.Secret) {
			t.Errorf("error repeats the secret: %v", err)
		}
	}
	if err := ValidTokenID(good.ID); err != nil {
		t.Error(err)
	}
	if err := ValidTokenID(good.String()); !errors.Is(err, ErrToken) {
		t.Errorf("ValidTokenID(token) = %v", err)
	}
}
