"""Property-based fuzzing of the reward servers over real HTTP (hypothesis; derandomized, so CI is
reproducible): 10,000+ malformed or odd requests in all to every endpoint of two server processes
(shapes behind a bearer token with tight limits, compressibility without one). Structured
ScoreRequests with random, mutated, truncated or bomb images, random prompts and metadata; mutated
protobuf and JSON bodies; arbitrary JSON; random bytes under random content types; random methods,
paths and headers. The server must never answer 5xx, every refusal of /v1/score must be the JSON
``{"error", "kind"}`` body, it must keep serving, and its memory must stay bounded (RSS sampled
before and after)."""

from __future__ import annotations

import json
import string
import struct
import zlib

import httpx
import numpy as np
import psutil
import pytest
from google.protobuf import json_format
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_reward_servers import ServerProc

from diffrl.models.shapes_world import all_prompts, render_prompt
from diffrl.proto import reward_pb2
from diffrl.reward_servers.images import encode_png

pytestmark = pytest.mark.slow

TOKEN = "fuzz-token-8c1e"
PER_SERVER = 5_000  # requests per server process (10,000 in all)
BATCH = 50  # requests per hypothesis example
RSS_GROWTH_LIMIT = 48 * 2**20


def _png_with_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


PROMPTS = all_prompts()[::37][:24]
_rng = np.random.default_rng(0)
VALID_PNGS = [encode_png(render_prompt(p, i)) for i, p in enumerate(PROMPTS[:8])] + [
    encode_png(_rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((1, 1), (3, 17), (64, 64), (130, 130))
]
ODD_IMAGES = [_png_with_header(60000, 60000), _png_with_header(0, 0), _png_with_header(8, 8), b"\x89PNG\r\n\x1a\n",
              b"\xff\xd8\xff\xe0" + b"\0" * 40, b"GIF89a" + b"\0" * 20, b""]
HEADER_TEXT = st.text(alphabet=string.ascii_letters + string.digits + " /;=.-_+*", max_size=40)
CONTENT_TYPES = ["application/x-protobuf", "application/protobuf", "application/json", "application/json; charset=utf-8",
                 "APPLICATION/X-PROTOBUF", "text/plain", "image/png", "multipart/form-data; boundary=x", ""]


@st.composite
def mutated(draw, data: bytes) -> bytes:
    if not data:
        return draw(st.binary(max_size=64))
    op = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "duplicate"]))
    i = draw(st.integers(0, len(data) - 1))
    if op == "flip":
        return data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1:]
    if op == "truncate":
        return data[:i]
    if op == "insert":
        return data[:i] + draw(st.binary(min_size=1, max_size=16)) + data[i:]
    if op == "delete":
        return data[:i] + data[i + draw(st.integers(1, 16)):]
    return data[:i] + data[i:] * 2


images = st.one_of(st.sampled_from(VALID_PNGS), st.sampled_from(ODD_IMAGES), st.binary(max_size=300),
                   st.sampled_from(VALID_PNGS).flatmap(mutated))
prompts = st.one_of(st.sampled_from(PROMPTS), st.text(max_size=60), st.just(""), st.just("x" * 5000),
                    st.sampled_from(PROMPTS).map(lambda p: p.replace(" ", "  ").upper()))
metadata = st.dictionaries(st.text(max_size=12), st.text(max_size=24), max_size=3)
items = st.builds(lambda png, prompt, meta: reward_pb2.Item(png=png, prompt=prompt, metadata=meta),
                  images, prompts, metadata)
score_requests = st.lists(items, max_size=20).map(lambda its: reward_pb2.ScoreRequest(items=its))
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                         max_size=4), max_leaves=12)


@st.composite
def score_body(draw) -> tuple[bytes, str]:
    kind = draw(st.sampled_from(["proto", "proto_mutated", "json", "json_mutated", "json_any", "bytes"]))
    if kind.startswith("proto"):
        body = draw(score_requests).SerializeToString()
        return (draw(mutated(body)) if kind == "proto_mutated" else body), "application/x-protobuf"
    if kind.startswith("json") and kind != "json_any":
        body = json_format.MessageToJson(draw(score_requests), indent=None).encode()
        return (draw(mutated(body)) if kind == "json_mutated" else body), "application/json"
    if kind == "json_any":
        return json.dumps(draw(json_values)).encode(), "application/json"
    return draw(st.binary(max_size=400)), draw(st.sampled_from(CONTENT_TYPES))


@st.composite
def http_requests(draw, token: str | None):
    """(method, path, headers, body) aimed at every endpoint, mostly at POST /v1/score."""
    target = draw(st.sampled_from(["score"] * 6 + ["info", "healthz", "metrics", "other"]))
    headers = {}
    auth = draw(st.sampled_from(["valid"] * 4 + ["missing", "wrong", "scheme"]))
    if token and auth == "valid":
        headers["authorization"] = f"Bearer {token}"
    elif auth == "wrong":
        headers["authorization"] = f"Bearer {draw(HEADER_TEXT)}"
    elif auth == "scheme":
        headers["authorization"] = draw(HEADER_TEXT)
    if draw(st.booleans()):
        headers["accept"] = draw(st.sampled_from(CONTENT_TYPES + ["*/*"]))
    if target == "score":
        body, ctype = draw(score_body())
        if draw(st.integers(0, 9)) == 0:
            ctype = draw(st.sampled_from(CONTENT_TYPES))
        if ctype:
            headers["content-type"] = ctype
        method = "POST" if draw(st.integers(0, 19)) else draw(st.sampled_from(["GET", "PUT", "DELETE", "PATCH"]))
        return method, "/v1/score", headers, body
    path = {"info": "/v1/info", "healthz": "/healthz", "metrics": "/metrics"}.get(target) or "/" + draw(
        st.text(alphabet=string.ascii_letters + string.digits + "/._-%", max_size=30))
    method = draw(st.sampled_from(["GET", "GET", "POST", "HEAD", "OPTIONS"]))
    return method, path, headers, draw(st.binary(max_size=64)) if method == "POST" else b""


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    token_file = tmp_path_factory.mktemp("tok") / "token"
    token_file.write_text(TOKEN)
    procs = {
        "shapes": ServerProc("shapes", "--token-file", str(token_file), "limits.max_request_bytes=65536",
                             "limits.max_items=16", "limits.max_image_pixels=16384", "limits.max_request_pixels=65536"),
        "compressibility": ServerProc("compressibility"),
    }
    try:
        for p in procs.values():
            p.wait_ready()
        yield procs
    finally:
        for p in procs.values():
            p.stop()


@pytest.mark.parametrize("name", ["shapes", "compressibility"])
def test_fuzz_reward_server(servers, name):
    proc = servers[name]
    token = TOKEN if name == "shapes" else None
    seen: dict[int, int] = {}
    sent = 0
    client = httpx.Client(base_url=proc.url, timeout=30)

    def send(method, path, headers, body) -> None:
        nonlocal sent
        headers = {k: v.strip() for k, v in headers.items()}  # h11 refuses values ending in blanks
        r = client.request(method, path, headers=headers, content=body)
        sent += 1
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert r.status_code < 500, (method, path, headers, body[:200], r.status_code, r.text[:300])
        if path == "/v1/score" and method == "POST" and r.status_code != 200:
            err = r.json()
            assert set(err) == {"error", "kind"} and err["error"] and err["kind"], err
        if path == "/v1/score" and r.status_code == 200:
            resp = reward_pb2.ScoreResponse()
            if r.headers["content-type"].startswith("application/json"):
                json_format.Parse(r.content, resp)
            else:
                resp.ParseFromString(r.content)
            assert len(resp.scores) == len(resp.errors)

    @settings(max_examples=PER_SERVER // BATCH, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(batch=st.lists(http_requests(token), min_size=BATCH, max_size=BATCH))
    def fuzz(batch):
        for req in batch:
            send(*req)

    # warm-up: every code path once (first requests allocate pools, caches, the scorer's state)
    good = reward_pb2.ScoreRequest(items=[reward_pb2.Item(png=VALID_PNGS[0], prompt=PROMPTS[0])]).SerializeToString()
    auth = {"authorization": f"Bearer {TOKEN}"} if token else {}
    for _ in range(100):
        send("POST", "/v1/score", {**auth, "content-type": "application/x-protobuf"}, good)
        send("POST", "/v1/score", {**auth, "content-type": "application/x-protobuf"}, good[:-7])
    process = psutil.Process(proc.proc.pid)
    rss0 = process.memory_info().rss
    fuzz()
    rss1 = process.memory_info().rss
    client.close()

    assert proc.proc.poll() is None, f"the server died:\n{proc.output()[-3000:]}"
    assert httpx.get(f"{proc.url}/healthz", timeout=5).status_code == 200
    assert sent >= PER_SERVER + 200, sent
    assert rss1 - rss0 < RSS_GROWTH_LIMIT, f"RSS grew {(rss1 - rss0) / 2**20:.1f} MiB over {sent} requests"
    refused = sum(v for k, v in seen.items() if 400 <= k < 500)
    assert seen.get(200, 0) > 0 and refused > PER_SERVER // 2, seen  # both paths were exercised
    print(f"\n{name}: {sent} requests, statuses {dict(sorted(seen.items()))}, "
          f"RSS {rss0 / 2**20:.1f} -> {rss1 / 2**20:.1f} MiB")
