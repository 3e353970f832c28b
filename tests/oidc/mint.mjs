// tollgate's test lab minter: keys and tokens made by an independent library (`jose`, and
// node:crypto where jose rightly refuses: an RSA key under 2048 bits), never by tollgate's own
// signer, so a refusal the tests see is tollgate judging a token it did not make.
//
// Usage: node mint.mjs REQUEST.json   (prints one JSON document)
//
// {"keys": [{"kid", "alg": "RS256"|"PS256"|"ES256"|..., "bits": 2048, "pin": true,
//            "use": "sig"|"enc", "nbf": s, "exp": s}, ...]}
//   → {"jwks": {"keys": [public JWKs]}, "private": {"<kid>": private JWK}}
//   `pin: false` leaves `alg` out of the public JWK (the key's kty then decides); `nbf` and
//   `exp` are tollgate's key-window members.
//
// {"tokens": [{"key": private JWK | null, "alg": "RS256", "header": {...}, "claims": {...},
//              "hmac_secret": "text"}, ...]}
//   → {"tokens": ["eyJ…", ...]}
//   The header is {"alg", "typ": "at+jwt", "kid": key.kid} merged with `header`. `alg: none`
//   gives an unsigned token; HS* signs with `hmac_secret` (the classic key-confusion forgery).
//
// {"flood": {"key": private JWK, "alg": "RS256", "claims": {...}, "count": 1000}}
//   → {"tokens": [...]}: `count` tokens each with a random kid no JWKS has, and its own jti.

import * as fs from 'node:fs';
import * as crypto from 'node:crypto';

import * as jose from 'jose';

const req = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));

const b64 = (buf) => Buffer.from(buf).toString('base64url');

async function makeKey(spec) {
  const bits = spec.bits ?? 2048;
  let priv;
  if (spec.alg.startsWith('RS') || spec.alg.startsWith('PS')) {
    // node:crypto: jose refuses to make (or sign with) RSA keys under 2048 bits.
    const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: bits });
    priv = privateKey.export({ format: 'jwk' });
  } else {
    const { privateKey } = await jose.generateKeyPair(spec.alg, { extractable: true });
    priv = await jose.exportJWK(privateKey);
  }
  priv.kid = spec.kid;
  priv.alg = spec.alg;
  const pub = publicOf(priv);
  pub.kid = spec.kid;
  pub.use = spec.use ?? 'sig';
  if (spec.pin !== false) pub.alg = spec.alg;
  if (spec.nbf !== undefined) pub.nbf = spec.nbf;
  if (spec.exp !== undefined) pub.exp = spec.exp;
  return { pub, priv };
}

function publicOf(jwk) {
  return crypto.createPublicKey({ key: jwk, format: 'jwk' }).export({ format: 'jwk' });
}

const HASH = { 256: 'sha256', 384: 'sha384', 512: 'sha512' };

async function sign(t) {
  const alg = t.alg ?? t.key?.alg;
  const header = { alg, typ: 'at+jwt', ...(t.key?.kid ? { kid: t.key.kid } : {}), ...t.header };
  const payload = new TextEncoder().encode(JSON.stringify(t.claims));
  if (alg === 'none') {
    return `${b64(JSON.stringify(header))}.${b64(payload)}.`;
  }
  if (alg.startsWith('HS')) {
    return new jose.CompactSign(payload)
      .setProtectedHeader(header)
      .sign(new TextEncoder().encode(t.hmac_secret));
  }
  const keyObject = crypto.createPrivateKey({ key: t.key, format: 'jwk' });
  const bits = keyObject.asymmetricKeyDetails?.modulusLength;
  if (alg.startsWith('RS') && bits !== undefined && bits < 2048) {
    // The same JWS, by hand: RSASSA-PKCS1-v1_5 over `header.payload`.
    const input = `${b64(JSON.stringify(header))}.${b64(payload)}`;
    const sig = crypto.sign(HASH[alg.slice(2)], Buffer.from(input), keyObject);
    return `${input}.${b64(sig)}`;
  }
  return new jose.CompactSign(payload).setProtectedHeader(header).sign(keyObject);
}

let out;
if (req.keys) {
  const jwks = { keys: [] };
  const priv = {};
  for (const spec of req.keys) {
    const k = await makeKey(spec);
    jwks.keys.push(k.pub);
    priv[spec.kid] = k.priv;
  }
  out = { jwks, private: priv };
} else if (req.tokens) {
  out = { tokens: await Promise.all(req.tokens.map(sign)) };
} else if (req.flood) {
  const f = req.flood;
  const keyObject = crypto.createPrivateKey({ key: f.key, format: 'jwk' });
  const tokens = [];
  for (let i = 0; i < f.count; i += 1) {
    const kid = `rnd-${crypto.randomBytes(12).toString('hex')}`;
    const claims = { ...f.claims, jti: `flood-${i}-${kid}` };
    tokens.push(await new jose.CompactSign(new TextEncoder().encode(JSON.stringify(claims)))
      .setProtectedHeader({ alg: f.alg, typ: 'at+jwt', kid })
      .sign(keyObject));
  }
  out = { tokens };
} else {
  throw new Error('mint.mjs: the request has none of keys, tokens, flood');
}
process.stdout.write(JSON.stringify(out));
