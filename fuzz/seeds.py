#!/usr/bin/env python3
"""Write the seed corpora under fuzz/corpus/<target>/ (checked in; re-run
this after changing the shapes below). Seeds are the attack shapes of
tests/attacks.rs and tests/gateway.rs, the shipped configuration and PAT
file, and a few valid inputs so the fuzzer starts from the allow path."""
import base64, json, os, re, zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "fuzz", "corpus")
B62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def pat(random30):
    n = zlib.crc32(random30.encode())
    check = ""
    for _ in range(6):
        check = B62[n % 62] + check
        n //= 62
    return "abx_pat_" + random30 + check


def b64(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def write(target, seeds):
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    for i, s in enumerate(seeds):
        if isinstance(s, str):
            s = s.encode()
        with open(os.path.join(d, f"seed-{i:03}"), "wb") as f:
            f.write(s)


paths = [
    "/v1/tenants/acme-prod/markers",
    "/v1/tenants/acme-prod/rules/r-1",
    "/v1/tenants/acme-prod/analytics/daily/2026",
    "/v1/accounts/acme/tenants/acme-prod/settings",
    "/v1/health",
    "/v1/tenants/acme%2Dprod/mark%65rs?q=%2F..%2F",
]
attack_paths = []
for f in ("tests/gateway.rs", "tests/attacks.rs"):
    text = open(os.path.join(ROOT, f)).read()
    attack_paths += [m for m in re.findall(r'"(/v1/[^"\s]*)"', text)]
attack_paths += ["*", "", "v1/tenants/acme-prod/markers", "/..", "/.", "//", "/%", "/%c0%ae%c0%ae/",
                 "/v1/tenants/acme-prod/..;/globex-web/markers", "/v1/tenants/acme-prod/\\markers"]
all_paths = sorted(set(paths + attack_paths))
write("path", all_paths)

good_pat = pat("0123456789abcdefghijABCDEFGHIJ")
hdr = b64(b'{"alg":"HS256","kid":"hs"}')
claims = b64(json.dumps({"iss": "https://auth.props.example", "aud": "airbrx-api", "jti": "j",
                         "exp": 1767229200, "cube": {"methods": ["GET"]}}).encode())
bearers = [
    "Bearer " + good_pat, "bearer  " + good_pat + " ", "Bearer " + good_pat[:-1] + "0",
    "Bearer " + f"{hdr}.{claims}.AAAA", "Bearer a.b.c", "Bearer a.b.c.d", "Bearer " + hdr + "..",
    "Basic dXNlcjpw", "Bearer", "Bearer ", "Bearer a=b", "Bearer a==", "Bearer a,b",
    "Bearer " + b64(b'{"alg":"none","kid":"hs"}') + "." + claims + ".",
]
write("bearer", bearers)

good_claims = {"iss": "https://auth.props.example", "aud": "airbrx-api", "jti": "j", "sub": "u",
               "exp": 1767229200, "cube": {"methods": ["GET"], "tags": ["markers"],
                                           "tenants": ["acme-prod"], "accounts": ["acme"]}}
variants = [good_claims]
for k, v in [("exp", 1767225570), ("exp", "1767229200"), ("nbf", 1767225631), ("iat", 1767225631),
             ("aud", ["x", "airbrx-api"]), ("aud", []), ("iss", None), ("jti", "a b"),
             ("cubes", [{"methods": ["*"], "tags": ["*"], "tenants": ["*"], "accounts": ["*"]}])]:
    c = dict(good_claims)
    c[k] = v
    variants.append(c)
claim_seeds = [b"\x00" + json.dumps(c).encode() for c in variants]
header = b'{"alg":"HS256","kid":"hs","crit":["x"]}'
claim_seeds.append(bytes([len(header)]) + header + json.dumps(good_claims).encode())
header = b'{"alg":"HS256","kid":"hs","jku":"https://evil.example/jwks"}'
claim_seeds.append(bytes([len(header)]) + header + json.dumps(good_claims).encode())
write("jwt_claims", claim_seeds)

decisions = []
for sel in (0, 1, 2, 3):
    for method in ("GET", "POST", "DELETE"):
        for p in paths[:5] + ["/v1/tenants/globex-web/markers", "/v1/tenants/acme-prod/../globex-web/markers"]:
            decisions.append(bytes([sel]) + f"{method} {p}\nBearer {good_pat}".encode())
write("decision", decisions)

configs = [open(os.path.join(ROOT, "gateway.yaml")).read()]
common = open(os.path.join(ROOT, "tests/common/mod.rs")).read()
m = re.search(r'pub const CONFIG: &str = r#"(.*?)"#;', common, re.S)
configs.append(m.group(1))
props = open(os.path.join(ROOT, "tests/properties/mod.rs")).read()
configs.append(re.search(r'const CONFIG: &str = r#"(.*?)"#;', props, re.S).group(1))
configs += ["listen: {addr: x}\n", "routes: [{path: a}]\n", "a: 1\na: 2\n", "- [\n", "{}"]
write("config", configs)

pat_files = [open(os.path.join(ROOT, "tokens.yaml")).read(), "tokens: []\n",
             "tokens:\n- id: a\n  sha256: " + "0" * 64 + "\n  cube: {methods: [GET]}\n" * 1,
             "tokens:\n  - id: a\n    name: |\n      - id: b\n    sha256: " + "0" * 64 + "\n    cube: {}\n",
             '{"tokens": []}']
write("pat_file", pat_files)
h1 = [
    b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
    b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\n\r\n",
    b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\ntransfer-encoding: chunked\r\n\r\n",
    b"HTTP/1.1 200 OK\r\ncontent-length: 7, 7\r\nconnection: close\r\n\r\n",
    b"5\r\nhello\r\n1;ext=\"v\"\r\n \r\n0\r\nx-sum: 3\r\n\r\n",
    b"ffffffffffffffff\r\n",
    b"0\r\n\n",
]
# First byte: bit 0 asks for HEAD, the rest is the read step.
write("h1_response", [bytes([flags]) + s for s in h1 for flags in (0, 1, 6)])
requests = [
    b"GET /v1/tenants/acme-prod/markers HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer x\r\n\r\n",
    b"GET / HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\ncontent-length: 3\r\n\r\nabc",
    b"DELETE /a HTTP/1.1\r\ncontent-length: 0\r\nconnection: keep-alive\r\n\r\n",
    b"\r\nGET /a<b> HTTP/1.1\nhost: a\n\n",
    b"HEAD / HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.0\r\n\r\n",
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    b"GET / HTTP/1.1\r\nx: caf\xe9\r\ntransfer-encoding: chunked\r\n\r\n",
    b"POST /a HTTP/1.1\r\ncontent-length: 5\r\n\r\nhelloGET / HTTP/1.1\r\n\r\n",
    b"POST /a HTTP/1.1\r\ncontent-length: 007\r\n\r\nhel",
    b"PUT /a HTTP/1.1\r\ncontent-length: 16384\r\ncontent-length: 16384\r\n\r\n",
]
write("fast_h1_head", requests)
print("seeds written to", OUT)
