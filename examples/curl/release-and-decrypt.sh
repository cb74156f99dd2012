#!/bin/sh
# Release a key from the skr sidecar with curl + jq, and decrypt a file with it using openssl:
# the flow of examples/python-app in a POSIX shell.
#
#   SKR_URL=http://127.0.0.1:8080 ./release-and-decrypt.sh FILE.jwe [OUT]
#
# FILE.jwe is a JWE in compact serialization with "alg":"dir", "enc":"A128CBC-HS256" (RFC 7518 5.2.3):
# the released 256-bit oct key is the content key; its first 16 bytes are the HMAC-SHA-256 key, its last
# 16 the AES-128-CBC key. openssl enc has no AEAD mode, so the tag is checked here (encrypt-then-MAC)
# before anything is decrypted. Make such a file with
#   python3 examples/python-app/app.py encrypt FILE --kid KEY --enc A128CBC-HS256 --out FILE.jwe
#
# Environment: SKR_URL (default http://127.0.0.1:8080); SKR_KID (default: the file's "kid");
#              SKR_CLIENT_TOKEN_FILE (a client token, if the sidecar requires one).
# Needs: curl, jq, openssl, od (apt-get install curl jq openssl).
# Writes the plaintext to OUT (mode 0600) or stdout. The key is kept in shell variables, never in a file;
# the scratch directory holds only the ciphertext and the MAC input.
# Exit: 0 decrypted; 1 release refused or the file failed authentication; 2 unusable input, missing
# tool, or no sidecar.
set -eu
umask 077

die() {
	code=$1
	shift
	printf 'release-and-decrypt: %s\n' "$*" >&2
	exit "$code"
}

for tool in curl jq openssl od; do
	command -v "$tool" >/dev/null 2>&1 || die 2 "$tool is not installed (apt-get install $tool)"
done
[ $# -ge 1 ] && [ $# -le 2 ] || die 2 "usage: $0 FILE.jwe [OUT]"
in=$1
out=${2:-}
[ -r "$in" ] || die 2 "cannot read $in"
url=${SKR_URL:-http://127.0.0.1:8080}
url=${url%/}

work=$(mktemp -d)
partial=
trap 'rm -rf "$work"; [ -z "$partial" ] || rm -f "$partial"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
nl='
'

# base64url (no padding) on stdin -> bytes on stdout; fails on anything else
b64url_decode() {
	s=$(cat)
	case $s in *[!A-Za-z0-9_-]*) return 1 ;; esac
	s=$(printf '%s' "$s" | tr -- '-_' '+/')
	case $((${#s} % 4)) in
	1) return 1 ;;
	2) s="$s==" ;;
	3) s="$s=" ;;
	esac
	[ -z "$s" ] || printf '%s' "$s" | openssl base64 -d -A
}

hex() { od -An -v -tx1 | tr -d ' \n'; }

# AL of RFC 7518 5.2.2.1: the AAD length in bits, 64-bit big-endian
al_bytes() {
	bits=$(($1 * 8))
	shift_by=56
	while [ "$shift_by" -ge 0 ]; do
		# shellcheck disable=SC2059 # an octal escape built on purpose
		printf "\\$(printf '%03o' $(((bits >> shift_by) & 255)))"
		shift_by=$((shift_by - 8))
	done
}

# --- read the JWE --------------------------------------------------------------------------------
jwe=$(cat "$in")
case $jwe in
*[!A-Za-z0-9_.-]*) die 2 "$in is not a JWE in compact serialization" ;;
*.*.*.*.*.*) die 2 "$in is not a JWE in compact serialization (too many parts)" ;;
*.*.*.*.*) ;;
*) die 2 "$in is not a JWE in compact serialization" ;;
esac
IFS=. read -r p_header p_key p_iv p_ct p_tag <<EOF
$jwe
EOF
header=$(printf '%s' "$p_header" | b64url_decode) || die 2 "the JWE header is not base64url"
printf '%s' "$header" | jq -e 'type == "object"' >/dev/null 2>&1 || die 2 "the JWE header is not a JSON object"
enc=$(printf '%s' "$header" | jq -r '.enc // ""')
case $enc in
A128CBC-HS256) ;;
A256GCM) die 2 "enc A256GCM needs an AEAD tool (openssl enc has none): decrypt it with examples/python-app, or encrypt with --enc A128CBC-HS256" ;;
*) die 2 "unsupported JWE enc '$enc' (expected A128CBC-HS256)" ;;
esac
printf '%s' "$header" | jq -e '.alg == "dir" and (has("zip") | not) and (has("crit") | not)' >/dev/null ||
	die 2 'the JWE header must have "alg":"dir" and no "zip" or "crit"'
[ -z "$p_key" ] || die 2 'a "dir" JWE has an empty encrypted-key part'
kid=${SKR_KID:-$(printf '%s' "$header" | jq -r '.kid // ""')}
[ -n "$kid" ] || die 2 "$in names no key (no kid in its header): set SKR_KID"

iv_hex=$(printf '%s' "$p_iv" | b64url_decode | hex) || die 2 "the JWE IV is not base64url"
tag_hex=$(printf '%s' "$p_tag" | b64url_decode | hex) || die 2 "the JWE tag is not base64url"
printf '%s' "$p_ct" | b64url_decode >"$work/ciphertext" || die 2 "the JWE ciphertext is not base64url"
[ ${#iv_hex} -eq 32 ] && [ ${#tag_hex} -eq 32 ] || die 2 "A128CBC-HS256 needs a 16-byte IV and a 16-byte tag"

# --- release the key -----------------------------------------------------------------------------
set -- -sS --noproxy '*' --max-time 60 -H 'Content-Type: application/json' -w "\\n%{http_code}"
if [ -n "${SKR_CLIENT_TOKEN_FILE:-}" ]; then
	[ -r "$SKR_CLIENT_TOKEN_FILE" ] || die 2 "cannot read SKR_CLIENT_TOKEN_FILE ($SKR_CLIENT_TOKEN_FILE)"
	# the header goes through a 0600 file, so the token never appears in curl's command line
	printf 'Authorization: Bearer %s\n' "$(cat "$SKR_CLIENT_TOKEN_FILE")" >"$work/auth"
	set -- "$@" -H "@$work/auth"
fi
request=$(jq -cn --arg kid "$kid" '{kid: $kid}')
response=$(curl "$@" --data-binary "$request" "$url/key/release") || die 2 "cannot reach the sidecar at $url"
status=${response##*"$nl"}
body=${response%"$nl"*}
if [ "$status" != 200 ]; then
	reason=$(printf '%s' "$body" | jq -r '"\(.code // "error"): \(.error // "")"' 2>/dev/null) || reason=$body
	die 1 "release of $kid refused: HTTP $status $reason"
fi
# {"key": "<the JWK as a JSON string>"}, exactly as with the Go sidecar
jwk=$(printf '%s' "$body" | jq -r '.key')
printf '%s' "$jwk" | jq -e '.kty == "oct"' >/dev/null || die 2 "the released key is not an oct (AES) key"
printf '%s' "$jwk" | jq -e '(.key_ops // ["decrypt"]) | index("decrypt") != null' >/dev/null ||
	die 1 "the released key's key_ops do not permit decrypt"
key_hex=$(printf '%s' "$jwk" | jq -r '.k' | b64url_decode | hex) || die 2 "the released key's k is not base64url"
unset jwk body response
[ ${#key_hex} -eq 64 ] || die 2 "A128CBC-HS256 needs a 256-bit key, the released key has $((${#key_hex} * 4)) bits"
mac_key=$(printf '%s' "$key_hex" | cut -c1-32)
enc_key=$(printf '%s' "$key_hex" | cut -c33-64)
unset key_hex
printf 'released %s (oct, 256 bits)\n' "$kid" >&2

# --- verify, then decrypt ------------------------------------------------------------------------
# tag = first 16 bytes of HMAC-SHA-256(MAC_KEY, AAD || IV || ciphertext || AL); AAD = the header as sent
{
	printf '%s' "$p_header"
	printf '%s' "$p_iv" | b64url_decode
	cat "$work/ciphertext"
	al_bytes ${#p_header}
} >"$work/mac-input"
mac_hex=$(openssl dgst -sha256 -mac HMAC -macopt "hexkey:$mac_key" -binary <"$work/mac-input" | hex | cut -c1-32)
[ "$mac_hex" = "$tag_hex" ] ||
	die 1 "authentication failed: the file was modified, or it was encrypted under another key"
if [ -z "$out" ]; then
	openssl enc -d -aes-128-cbc -K "$enc_key" -iv "$iv_hex" -in "$work/ciphertext" || die 1 "decryption failed"
	exit 0
fi
# the plaintext never lands in the scratch directory: a 0600 file next to OUT, renamed when complete
partial="$out.partial.$$"
openssl enc -d -aes-128-cbc -K "$enc_key" -iv "$iv_hex" -in "$work/ciphertext" -out "$partial" ||
	die 1 "decryption failed"
mv -f "$partial" "$out"
partial=
printf 'decrypted to %s\n' "$out" >&2
