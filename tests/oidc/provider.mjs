// tollgate's test lab OpenID Provider: the npm `oidc-provider` package (a certified OpenID
// Provider), served over HTTPS, issuing JWT access tokens with the client-credentials grant.
//
// Usage: node provider.mjs CONFIG.json
//
// CONFIG (written by tests/support/oidc.rs):
//   issuer        "https://198.18.x.y"          the `iss` of every token and of discovery
//   host, port    where to listen
//   cert, key     PEM files of the server certificate (issued by the test's CA)
//   keys          path of the private JWKS; made with one key of `alg` when missing, so a
//                 restart keeps the same keys (the outage test restarts the provider)
//   alg           RS256 | PS256 | ES256: the signing algorithm of access tokens
//   jwk_alg       whether the published keys carry `alg` (default true; RS256 without it is
//                 how Entra ID publishes its keys)
//   ttl_s         access-token lifetime (default 300)
//   resources     { "<resource indicator = aud>": "<scope granted>" }
//   clients       [{ client_id, client_secret, claims: { extra access-token claims } }]
//   jwks_max_age  Cache-Control max-age of the JWKS response (absent: the provider's own)
//
// Lab control endpoints (not part of OpenID; the tests use them to count and to steer):
//   GET  /__counts              {"jwks": n, "discovery": n, "token": n} since start
//   POST /__rotate              a new signing key of `alg` (new kid) goes first; the old key
//                               stays published; the key file is rewritten; {"kid": new}
//   POST /__jwks_max_age?s=N    Cache-Control: max-age=N on the JWKS from now (N<0: none)
//   POST /__jwks_mode?mode=M    M = normal | not_json | large (JWKS padded to ~1 MiB)
//   GET  /jwks?pad=1            the JWKS padded to ~1 MiB, whatever the mode (a source that
//                               is always over its size limit)
//
// It prints one line `listening <issuer>` when it accepts connections.

import * as fs from 'node:fs';
import * as https from 'node:https';
import * as crypto from 'node:crypto';

import Provider, { errors } from 'oidc-provider';
import * as jose from 'jose';

const conf = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const alg = conf.alg;
const jwkAlg = conf.jwk_alg !== false;

const counts = { jwks: 0, discovery: 0, token: 0 };
let jwksMaxAge = conf.jwks_max_age ?? null;
let jwksMode = 'normal';

// A new private JWK of `alg` with kid `<alg>-<n>`: readable in test failures.
async function newKey(n) {
  const { privateKey } = await jose.generateKeyPair(alg, { extractable: true, modulusLength: 2048 });
  const jwk = await jose.exportJWK(privateKey);
  jwk.kid = `${alg.toLowerCase()}-${n}`;
  jwk.use = 'sig';
  if (jwkAlg) jwk.alg = alg;
  return jwk;
}

async function loadKeys() {
  if (fs.existsSync(conf.keys)) return JSON.parse(fs.readFileSync(conf.keys, 'utf8'));
  const jwks = { keys: [await newKey(1)] };
  saveKeys(jwks);
  return jwks;
}

function saveKeys(jwks) {
  const tmp = `${conf.keys}.tmp`;
  fs.writeFileSync(tmp, JSON.stringify(jwks), { mode: 0o600 });
  fs.renameSync(tmp, conf.keys);
}

const clients = new Map(conf.clients.map((c) => [c.client_id, c]));

function build(jwks) {
  const provider = new Provider(conf.issuer, {
    jwks,
    clients: conf.clients.map((c) => ({
      client_id: c.client_id,
      client_secret: c.client_secret,
      grant_types: ['client_credentials'],
      response_types: [],
      redirect_uris: [],
      token_endpoint_auth_method: 'client_secret_basic',
      // An ES256-only keystore has no RSA key for the RS256 default.
      id_token_signed_response_alg: alg,
    })),
    clientDefaults: { id_token_signed_response_alg: alg },
    scopes: [...new Set(Object.values(conf.resources).flatMap((s) => s.split(' ')))],
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      introspection: { enabled: false },
      resourceIndicators: {
        enabled: true,
        // A request without `resource` gets the first configured one.
        defaultResource: () => Object.keys(conf.resources)[0],
        useGrantedResource: () => true,
        getResourceServerInfo: (ctx, resource) => {
          const scope = conf.resources[resource];
          if (scope === undefined) throw new errors.InvalidTarget();
          return {
            scope,
            audience: resource,
            accessTokenTTL: conf.ttl_s ?? 300,
            accessTokenFormat: 'jwt',
            jwt: { sign: { alg } },
          };
        },
      },
    },
    // Per-client claims as the IdPs the docs name put them: groups, realm_access.roles, ...
    extraTokenClaims: (ctx, token) => clients.get(token.clientId)?.claims,
  });
  provider.proxy = false;
  return provider;
}

let keys = await loadKeys();
let handler = build(keys).callback();

function json(res, status, body) {
  res.writeHead(status, { 'content-type': 'application/json' });
  res.end(JSON.stringify(body));
}

async function control(req, res, url) {
  if (req.method === 'GET' && url.pathname === '/__counts') return json(res, 200, counts);
  if (req.method !== 'POST') return json(res, 405, { error: 'method' });
  if (url.pathname === '/__rotate') {
    const key = await newKey(keys.keys.length + 1);
    keys = { keys: [key, ...keys.keys] };
    saveKeys(keys);
    handler = build(keys).callback();
    return json(res, 200, { kid: key.kid });
  }
  if (url.pathname === '/__jwks_max_age') {
    const s = Number(url.searchParams.get('s'));
    jwksMaxAge = s >= 0 ? s : null;
    return json(res, 200, { jwks_max_age: jwksMaxAge });
  }
  if (url.pathname === '/__jwks_mode') {
    jwksMode = url.searchParams.get('mode');
    return json(res, 200, { mode: jwksMode });
  }
  return json(res, 404, { error: 'unknown control' });
}

function serveJwks(req, res, url) {
  if (jwksMode === 'not_json') {
    res.writeHead(200, { 'content-type': 'application/json' });
    return res.end('<html>maintenance</html>');
  }
  // Everything else goes to the provider; only the Cache-Control header is ours.
  if (jwksMaxAge !== null) {
    const writeHead = res.writeHead.bind(res);
    res.writeHead = (status, ...rest) => {
      res.setHeader('cache-control', `public, max-age=${jwksMaxAge}`);
      return writeHead(status, ...rest);
    };
  }
  if (jwksMode === 'large' || url.searchParams.get('pad') === '1') {
    // The real JWKS plus a padding member: valid JSON, over any sane size limit.
    const pub = { keys: keys.keys.map(publicOf), padding: 'x'.repeat(1 << 20) };
    res.writeHead(200, { 'content-type': 'application/json' });
    return res.end(JSON.stringify(pub));
  }
  return handler(req, res);
}

function publicOf(jwk) {
  const key = crypto.createPublicKey({ key: jwk, format: 'jwk' });
  const pub = key.export({ format: 'jwk' });
  return { ...pub, kid: jwk.kid, use: jwk.use, ...(jwk.alg ? { alg: jwk.alg } : {}) };
}

const server = https.createServer(
  { cert: fs.readFileSync(conf.cert), key: fs.readFileSync(conf.key) },
  (req, res) => {
    const url = new URL(req.url, conf.issuer);
    if (url.pathname.startsWith('/__')) {
      control(req, res, url).catch((e) => json(res, 500, { error: String(e) }));
      return;
    }
    if (req.method === 'GET' && url.pathname === '/jwks') {
      counts.jwks += 1;
      return serveJwks(req, res, url);
    }
    if (req.method === 'GET' && url.pathname === '/.well-known/openid-configuration') {
      counts.discovery += 1;
    }
    if (req.method === 'POST' && url.pathname === '/token') counts.token += 1;
    return handler(req, res);
  },
);

server.listen(conf.port, conf.host, () => {
  console.log(`listening ${conf.issuer}`);
});

// Stopped means gone at once: the outage test needs connections refused, not drained.
for (const sig of ['SIGTERM', 'SIGINT']) process.on(sig, () => process.exit(0));
