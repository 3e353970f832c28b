#!/bin/sh
# Regenerates the RSA TEST keys and the tokens OpenSSL signs with them (see README.md).
# Run from this directory; needs openssl and python3. Not run by the build or the tests.
set -eu
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
b64url() { python3 -c 'import sys,base64; print(base64.urlsafe_b64encode(sys.stdin.buffer.read()).rstrip(b"=").decode(), end="")'; }
# ring signs with 2048- and 4096-bit keys in the unit tests: PKCS#8 DER.
for bits in 2048 4096; do
    openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:$bits -out "$tmp/k.pem" 2>/dev/null
    openssl pkcs8 -topk8 -nocrypt -outform DER -in "$tmp/k.pem" -out rsa$bits.pk8
done
# ring cannot sign with 1024 (refused) or 8192 bits (over its signing limit): OpenSSL signs a token
# with each, and the public key is kept as a JWK.
payload='{"jti":"t-1","sub":"alice","aud":"inference","iat":1799999990,"exp":1800000600,"tollgate_class":"batch","tollgate_plan":"pro","tollgate_roles":["reader","writer"]}'
for spec in 1024:RS256:sha256: 8192:RS256:sha256: 2048:PS256:sha256:pss; do
    IFS=: read -r bits alg md pad <<SPEC
$spec
SPEC
    name=rsa$bits-$(echo "$alg" | tr 'A-Z' 'a-z')
    openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:$bits -out "$tmp/k.pem" 2>/dev/null
    n=$(openssl rsa -in "$tmp/k.pem" -noout -modulus | cut -d= -f2 | python3 -c 'import sys,binascii; sys.stdout.buffer.write(binascii.unhexlify(sys.stdin.read().strip()))' | b64url)
    printf '{"kty":"RSA","kid":"%s","use":"sig","n":"%s","e":"AQAB"}\n' "$name" "$n" > $name.jwk.json
    h=$(printf '{"alg":"%s","kid":"%s","typ":"JWT"}' "$alg" "$name" | b64url)
    p=$(printf '%s' "$payload" | b64url)
    if [ -n "$pad" ]; then
        opts="-sigopt rsa_padding_mode:pss -sigopt rsa_pss_saltlen:digest -sigopt rsa_mgf1_md:$md"
    else
        opts=""
    fi
    # shellcheck disable=SC2086
    s=$(printf '%s.%s' "$h" "$p" | openssl dgst -$md -sign "$tmp/k.pem" $opts | b64url)
    printf '%s.%s.%s\n' "$h" "$p" "$s" > $name.jwt
done
