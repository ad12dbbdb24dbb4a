"""Reward scorers in-process: shapes, OCR (real tesseract on rendered words), compressibility, the
Haar-cascade detector (on drawn faces), ONNX (a model built here), safe image decoding, and the
micro-batcher / per-item failure isolation."""

from __future__ import annotations

import asyncio
import io
import math
import shutil
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from diffrl.config import ConfigError
from diffrl.models.shapes_world import all_prompts, render_prompt
from diffrl.reward_servers.batching import MicroBatcher, score_robustly
from diffrl.reward_servers.bench import draw_faces, render_word
from diffrl.reward_servers.images import ImageError, decode_image, encode_png, image_header
from diffrl.reward_servers.scorers import get_scorer, make_options, scorer_names, shapes
from diffrl.reward_servers.scorers.base import Scorer
from diffrl.reward_servers.scorers.detector import count_score
from diffrl.reward_servers.scorers.ocr import levenshtein, ocr_score, target_text

HAS_TESSERACT = shutil.which("tesseract") is not None


# ----------------------------------------------------------------------------- helpers (also used by other tests)
def build_onnx_model(path, fixed_batch: bool = False) -> None:
    """x [N, 3, 8, 8] -> logits [N, 2] = mean over pixels @ W + b (class 1 = "red"), and
    margin [N, 1] = log(0.5 - mean red), NaN for mostly red images (a real non-finite output)."""
    n = 1 if fixed_batch else "N"
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, 3, 8, 8])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [n, 2])
    margin = helper.make_tensor_value_info("margin", TensorProto.FLOAT, [n, 1])
    w = helper.make_tensor("W", TensorProto.FLOAT, [3, 2], [-4.0, 4.0, 2.0, -2.0, 2.0, -2.0])
    b = helper.make_tensor("B", TensorProto.FLOAT, [2], [0.0, 0.0])
    half = helper.make_tensor("half", TensorProto.FLOAT, [1], [0.5])
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["m"], axes=[2, 3], keepdims=0),
        helper.make_node("MatMul", ["m", "W"], ["mw"]),
        helper.make_node("Add", ["mw", "B"], ["logits"]),
        helper.make_node("Slice", ["m", "s0", "s1", "ax"], ["red"]),
        helper.make_node("Sub", ["half", "red"], ["d"]),
        helper.make_node("Log", ["d"], ["margin"]),
    ]
    inits = [w, b, half, helper.make_tensor("s0", TensorProto.INT64, [1], [0]),
             helper.make_tensor("s1", TensorProto.INT64, [1], [1]), helper.make_tensor("ax", TensorProto.INT64, [1], [1])]
    graph = helper.make_graph(nodes, "tiny_reward", [x], [logits, margin], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def solid(rgb, size=(16, 16)) -> np.ndarray:
    return np.full((*size, 3), rgb, np.uint8)


# ----------------------------------------------------------------------------- registry
def test_registry_lists_and_validates_options():
    assert set(scorer_names()) >= {"shapes", "ocr", "compressibility", "detector", "onnx"}
    with pytest.raises(KeyError, match="unknown reward"):
        get_scorer("nope")
    with pytest.raises(ConfigError, match="scorer.bogus"):
        make_options("compressibility", bogus=1)
    with pytest.raises(ConfigError, match="scorer.direction"):
        make_options("compressibility", direction="sideways")
    with pytest.raises(ConfigError, match="scorer.path"):
        make_options("onnx", path="/nonexistent.onnx")


# ----------------------------------------------------------------------------- shapes
def test_shapes_scorer_matches_detector_and_options():
    prompts = all_prompts()[::37][:12]
    images = [render_prompt(p, i) for i, p in enumerate(prompts)]
    wrong = prompts[1:] + prompts[:1]
    scorer = get_scorer("shapes")
    s_right, d_right = scorer.score_batch(images, prompts, [{}] * len(images))
    s_wrong, d_wrong = scorer.score_batch(images, wrong, [{}] * len(images))
    assert s_right == [shapes.score(im, p).strict for im, p in zip(images, prompts)]
    assert np.mean(s_right) > 0.9 and np.mean(s_wrong) < 0.2
    assert set(d_right) >= {"count", "color", "shape", "partial", "strict"}
    partial = get_scorer("shapes", score="partial").score_batch(images, wrong, [{}] * len(images))[0]
    assert partial == pytest.approx(d_wrong["partial"]) and 0 < np.mean(partial) < 1
    # mixed image sizes in one batch
    big = cv2.resize(images[0], (64, 64), interpolation=cv2.INTER_NEAREST)
    mixed = scorer.score_batch([big, images[1]], prompts[:2], [{}, {}])[0]
    assert mixed[1] == s_right[1]
    assert scorer.check_item("hello world", {}) and scorer.check_item(prompts[0], {}) is None
    assert scorer.check_item("", {})


# ----------------------------------------------------------------------------- OCR
def test_ocr_metric_arithmetic():
    assert levenshtein("kitten", "sitting") == 3 and levenshtein("", "abc") == 3 and levenshtein("abc", "abc") == 0
    assert target_text('a sign that says "Hello World"', {}) == "Hello World"
    assert target_text("a sign that says \u201chi\u201d", {}) == "hi"
    assert target_text("no quotes", {"text": "x"}) == "x" and target_text("no quotes", {}) is None
    assert ocr_score("Hello World", "hello world") == (1.0, 0)          # case and spaces ignored
    assert ocr_score("xxhelloxx", "hello")[0] == 1.0                     # flow_grpo: contained = exact
    assert ocr_score("xxhelloxx", "hello", "normalized")[0] == pytest.approx(1 - 4 / 9)
    assert ocr_score("hallo", "hello")[0] == pytest.approx(0.8)
    assert ocr_score("completely different text", "hi")[0] == 0.0        # distance capped at len(gt)
    assert ocr_score("", "hello") == (0.0, 5)


@pytest.mark.skipif(not HAS_TESSERACT, reason="tesseract is not installed (apt-get install tesseract-ocr)")
def test_ocr_reads_rendered_words_in_one_tesseract_call():
    words = ["hello", "diffrl", "reward", "zebra", "ocean", "policy", "flow", "group"]
    images = [render_word(w, 128 if len(w) <= 5 else 256) for w in words]
    blank = solid((255, 255, 255), (64, 128))
    scorer = get_scorer("ocr")
    prompts = [f'a sign that says "{w}"' for w in words]
    scores, details = scorer.score_batch(images + [blank], prompts + ['a sign that says "hello"'], [{}] * 9)
    assert scores[:8] == [1.0] * 8, scorer.read_text(images)
    assert scores[8] == 0.0 and details["chars_read"][8] == 0.0  # blank: nothing read, no hallucination
    shifted = scorer.score_batch(images, prompts[1:] + prompts[:1], [{}] * 8)[0]
    assert max(shifted) < 0.5
    # parallel tesseract processes give the same readings, in order
    par = get_scorer("ocr", parallel=3)
    assert par.read_text(images) == scorer.read_text(images) == words
    assert scorer.check_item("no quoted text", {}) and scorer.check_item('say ""', {})
    assert scorer.check_item("no quoted text", {"text": "ok"}) is None


# ----------------------------------------------------------------------------- compressibility
def test_compressibility_both_directions():
    rng = np.random.default_rng(0)
    flat, noise = solid((120, 30, 200), (64, 64)), rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    comp = get_scorer("compressibility")
    inc = get_scorer("compressibility", direction="incompress")
    s, d = comp.score_batch([flat, noise], ["", ""], [{}, {}])
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format="JPEG", quality=95)
    assert d["kb"][1] == pytest.approx(buf.tell() / 1000)
    assert s[0] > s[1] and s == [-k for k in d["kb"]] and all(x < 0 for x in s)
    s2 = inc.score_batch([flat, noise], ["", ""], [{}, {}])[0]
    assert s2 == d["kb"] and s2[1] > s2[0]
    assert comp.info()["max_score"] == 0.0 and comp.info()["min_score"] == -math.inf


# ----------------------------------------------------------------------------- detector
def test_detector_counts_drawn_faces():
    det = get_scorer("detector")
    assert [len(det.detect(draw_faces(n))) for n in (0, 1, 2, 3)] == [0, 1, 2, 3]
    blank = solid((255, 255, 255), (120, 160))
    images = [draw_faces(2), draw_faces(2), draw_faces(3), blank, blank]
    meta = [{"count": "2"}, {"count": "1"}, {"count": "2"}, {"count": "0"}, {"count": "2"}]
    scores, details = det.score_batch(images, [""] * 5, meta)
    assert details["detected"] == [2.0, 2.0, 3.0, 0.0, 0.0]
    assert scores == pytest.approx([1.0, 0.5, 1 - 1 / 3, 1.0, 0.0])
    assert det.check_item("", {}) and det.check_item("", {"count": "two"}) and det.check_item("", {"count": "-1"})
    assert det.check_item("", {"count": " 3 "}) is None


def test_count_score_arithmetic():
    assert count_score(0, 0) == 1.0 and count_score(4, 4) == 1.0
    assert count_score(1, 2) == 0.5 and count_score(3, 2) == pytest.approx(2 / 3)
    assert count_score(0, 5) == 0.0 and count_score(7, 0) == 0.0


# ----------------------------------------------------------------------------- onnx
def test_onnx_scorer_with_built_model(tmp_path):
    path = tmp_path / "tiny.onnx"
    build_onnx_model(path)
    red, blue = solid((230, 20, 20)), solid((20, 20, 230))
    opts = {"path": str(path), "input_size": [8, 8], "mapping": "softmax", "index": 1, "name": "redness"}
    sc = get_scorer("onnx", **opts)
    assert sc.name == "redness" and sc.version.startswith("sha256:") and (sc.min_score, sc.max_score) == (0.0, 1.0)
    scores, details = sc.score_batch([red, blue, cv2.resize(red, (40, 30))], ["", "", ""], [{}] * 3)
    assert details["value"] == pytest.approx(scores)
    # expected: softmax of mean(x) @ W, computed by hand
    w = np.array([[-4.0, 4.0], [2.0, -2.0], [2.0, -2.0]])

    def expect(rgb):
        z = (np.array(rgb) / 255.0) @ w
        return float(np.exp(z[1]) / np.exp(z).sum())

    assert scores[:2] == pytest.approx([expect((230, 20, 20)), expect((20, 20, 230))], rel=1e-5)
    assert scores[2] == pytest.approx(scores[0], rel=1e-5) and scores[0] > 0.9 and scores[1] < 0.1
    # scale/offset, element mapping, NHWC rejected by the model's shape, fixed-batch model run per image
    el = get_scorer("onnx", path=str(path), input_size=[8, 8], mapping="element", index=1, scale=2.0, offset=1.0)
    z = (np.array((230, 20, 20)) / 255.0) @ w
    assert el.score_batch([red], [""], [{}])[0][0] == pytest.approx(2 * z[1] + 1, rel=1e-5)
    fixed = tmp_path / "fixed.onnx"
    build_onnx_model(fixed, fixed_batch=True)
    fx = get_scorer("onnx", **{**opts, "path": str(fixed)})
    assert fx.score_batch([red, blue], ["", ""], [{}, {}])[0] == pytest.approx(scores[:2], rel=1e-6)
    # output by name: log(0.5 - red) is NaN for red images -> an item error, not a score
    nan = get_scorer("onnx", path=str(path), input_size=[8, 8], output="margin")
    res = score_robustly(nan, [blue, red], ["", ""], [{}, {}])
    assert res.errors[0] == "" and "non-finite" in res.errors[1]


# ----------------------------------------------------------------------------- decoding
def _png_with_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width x height, followed by a tiny IDAT (a decompression bomb's shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_decode_refuses_bombs_truncation_and_garbage():
    im = np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    png = encode_png(im)
    assert (decode_image(png, 1000) == im).all()
    assert image_header(png) == ("png", 30, 20)
    _, jpg = cv2.imencode(".jpg", im)
    assert image_header(jpg.tobytes()) == ("jpeg", 30, 20) and decode_image(jpg.tobytes(), 1000).shape == (20, 30, 3)
    t0 = time.perf_counter()
    with pytest.raises(ImageError, match="exceeds the limit") as err:
        decode_image(_png_with_header(100_000, 100_000), 4096 * 4096)
    assert err.value.kind == "image_too_large" and time.perf_counter() - t0 < 0.1
    with pytest.raises(ImageError):
        decode_image(png, 599)  # 600 pixels
    for bad in (png[: len(png) // 2], png[:20], b"", b"GIF89a....", jpg.tobytes()[:200], _png_with_header(8, 8)):
        with pytest.raises(ImageError):
            decode_image(bad, 10**6)
    grey = encode_png(np.repeat(im[..., :1], 3, axis=2))
    assert decode_image(grey, 1000).shape == (20, 30, 3)


# ----------------------------------------------------------------------------- execution
class _Flaky(Scorer):
    """Fault injection: fails any batch containing an image whose first pixel is 0."""

    name = "flaky"

    def score_batch(self, images, prompts, metadata):
        if any(int(im[0, 0, 0]) == 0 for im in images):
            raise RuntimeError("cannot score a black image")
        return [float(im[0, 0, 0]) for im in images], {"v": [1.0] * len(images)}


def test_score_robustly_isolates_failing_items():
    ims = [solid((v, 0, 0), (2, 2)) for v in (5, 0, 7)]
    res = score_robustly(_Flaky(), ims, ["", "", ""], [{}] * 3)
    assert res.scores[0] == 5.0 and res.scores[2] == 7.0 and math.isnan(res.scores[1])
    assert res.errors[0] == res.errors[2] == "" and "cannot score a black image" in res.errors[1]
    assert res.details["v"][0] == 1.0 and math.isnan(res.details["v"][1])


def test_microbatcher_merges_concurrent_requests():
    calls: list[int] = []
    lock = threading.Lock()

    def run(images, prompts, metadata):
        with lock:
            calls.append(len(images))
        time.sleep(0.02)
        return score_robustly(_Flaky(), images, prompts, metadata)

    async def main():
        pool = ThreadPoolExecutor(1)
        b = MicroBatcher(run, pool, max_items=16, max_wait_s=0.05, slots=1)
        reqs = [[solid((v + k, 0, 0), (2, 2)) for k in range(3)] for v in range(1, 11)]
        outs = await asyncio.gather(*(b.submit(r, [""] * 3, [{}] * 3) for r in reqs))
        await b.stop()
        pool.shutdown()
        return reqs, outs

    reqs, outs = asyncio.run(main())
    for r, o in zip(reqs, outs):
        assert o.scores == [float(im[0, 0, 0]) for im in r] and o.errors == ["", "", ""]
    assert sum(calls) == 30 and len(calls) < 10 and max(calls) <= 16
