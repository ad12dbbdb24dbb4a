"""``onnx``: any ONNX model given by a local path, as a reward.

Pre-processing (per image, uint8 RGB): resize to ``input_size`` [H, W] (bilinear; area when
shrinking), optionally reorder to BGR, x = (pixel * pixel_scale - mean[c]) / std[c], laid out as
NCHW or NHWC float32 (or the model's float16). The batch dimension is used when the model's first
input dimension is dynamic; a model with a fixed batch of 1 is run image by image.

Output-to-score mapping: take output ``output`` (a name, or an index as a string, default "0"),
flatten each item's row, then ``mapping``:

- ``element``: v = row[index]
- ``softmax``: v = softmax(row)[index] (probability of class ``index``)
- ``sigmoid``: v = 1 / (1 + exp(-row[index]))

score = scale * v + offset. The declared range is [offset, scale + offset] (ordered) for softmax
and sigmoid, and ``min_score`` / ``max_score`` (default unbounded) for element.
``name`` sets the reward name (several ONNX rewards can run side by side); the version is the
first 12 hex digits of the model file's SHA-256. Concurrent requests are micro-batched (the
session releases the GIL and a batch of N costs far less than N runs).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from diffrl.config import require
from diffrl.reward_servers.scorers.base import Details, Scorer, check_lengths


@dataclass
class OnnxOptions:
    path: str = ""
    """Local path of the .onnx model (required)."""
    name: str = "onnx"
    """Reward name reported by /v1/info and used in metrics."""
    input_size: list[int] = field(default_factory=lambda: [224, 224])
    """[height, width] the image is resized to."""
    layout: str = "NCHW"
    """Input layout: NCHW or NHWC."""
    channel_order: str = "RGB"
    """RGB or BGR."""
    pixel_scale: float = 1.0 / 255.0
    """Pixels (0..255) are multiplied by this before mean/std."""
    mean: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    """Per-channel mean subtracted (after pixel_scale), in channel_order."""
    std: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    """Per-channel std divided by."""
    input: str = ""
    """Input name (empty: the model's first input)."""
    output: str = "0"
    """Output name, or its index as a string."""
    mapping: str = "element"
    """element (row[index]), softmax (probability of class index) or sigmoid (of row[index])."""
    index: int = 0
    """Element index in the flattened per-item output (or the class index for softmax)."""
    scale: float = 1.0
    """score = scale * value + offset."""
    offset: float = 0.0
    """score = scale * value + offset."""
    min_score: float = -math.inf
    """Declared lowest score (mapping=element only)."""
    max_score: float = math.inf
    """Declared highest score (mapping=element only)."""
    higher_is_better: bool = True
    """Whether a higher score is better."""
    threads: int = 1
    """onnxruntime intra-op threads per run (the server runs several runs in parallel)."""

    def validate(self) -> None:
        require(bool(self.path) and Path(self.path).is_file(), "path", "the path of an existing .onnx file",
                self.path)
        require(bool(self.name), "name", "a non-empty reward name", self.name)
        require(len(self.input_size) == 2 and all(int(v) > 0 for v in self.input_size), "input_size",
                "[height, width] > 0", list(self.input_size))
        require(self.layout in ("NCHW", "NHWC"), "layout", "NCHW or NHWC", self.layout)
        require(self.channel_order in ("RGB", "BGR"), "channel_order", "RGB or BGR", self.channel_order)
        require(len(self.mean) == 3, "mean", "3 values", list(self.mean))
        require(len(self.std) == 3 and all(s != 0 for s in self.std), "std", "3 non-zero values", list(self.std))
        require(self.mapping in ("element", "softmax", "sigmoid"), "mapping", "element, softmax or sigmoid",
                self.mapping)
        require(self.index >= 0, "index", "an int >= 0", self.index)
        require(self.threads >= 1, "threads", "an int >= 1", self.threads)


class OnnxScorer(Scorer):
    prefers_batching = True
    Options = OnnxOptions

    def __init__(self, options: OnnxOptions | None = None):
        import onnxruntime as ort

        if options is None:
            raise ValueError("the onnx reward needs options (at least path=...)")
        self.options = o = options
        so = ort.SessionOptions()
        so.intra_op_num_threads = o.threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        self.session = ort.InferenceSession(o.path, sess_options=so, providers=["CPUExecutionProvider"])
        inputs = self.session.get_inputs()
        inp = next((i for i in inputs if i.name == o.input), None) if o.input else inputs[0]
        if inp is None:
            raise ValueError(f"model {o.path} has no input {o.input!r} (inputs: {[i.name for i in inputs]})")
        self.input_name = inp.name
        self.dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
        if inp.type not in ("tensor(float)", "tensor(float16)"):
            raise ValueError(f"model input {inp.name!r} is {inp.type}; only float/float16 image inputs are supported")
        self.fixed_batch = isinstance(inp.shape[0], int) if inp.shape else False
        outputs = [x.name for x in self.session.get_outputs()]
        if o.output in outputs:
            self.output_name = o.output
        elif o.output.isdigit() and int(o.output) < len(outputs):
            self.output_name = outputs[int(o.output)]
        else:
            raise ValueError(f"model {o.path} has no output {o.output!r} (outputs: {outputs})")
        self.name = o.name
        self.version = "sha256:" + hashlib.sha256(Path(o.path).read_bytes()).hexdigest()[:12]
        self.higher_is_better = o.higher_is_better
        if o.mapping == "element":
            self.min_score, self.max_score = o.min_score, o.max_score
        else:
            a, b = o.offset, o.scale + o.offset
            self.min_score, self.max_score = min(a, b), max(a, b)
        self.description = (f"ONNX model {Path(o.path).name}: {o.mapping}[{o.index}] of output "
                            f"{self.output_name!r} x {o.scale} + {o.offset}; details: value")
        self._mean = np.asarray(o.mean, dtype=np.float32)
        self._inv_std = 1.0 / np.asarray(o.std, dtype=np.float32)

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        h, w = (int(v) for v in self.options.input_size)
        im = np.asarray(image)
        if im.shape[:2] != (h, w):
            shrink = im.shape[0] > h or im.shape[1] > w
            im = cv2.resize(im, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        if self.options.channel_order == "BGR":
            im = im[..., ::-1]
        x = (im.astype(np.float32) * np.float32(self.options.pixel_scale) - self._mean) * self._inv_std
        if self.options.layout == "NCHW":
            x = x.transpose(2, 0, 1)
        return x

    def _map(self, rows: np.ndarray) -> np.ndarray:
        o = self.options
        rows = rows.reshape(len(rows), -1).astype(np.float64)
        if o.index >= rows.shape[1]:
            raise ValueError(f"output {self.output_name!r} has {rows.shape[1]} values per item; index {o.index} "
                             "is out of range")
        if o.mapping == "softmax":
            z = rows - rows.max(axis=1, keepdims=True)
            e = np.exp(z)
            v = e[:, o.index] / e.sum(axis=1)
        elif o.mapping == "sigmoid":
            v = 1.0 / (1.0 + np.exp(-rows[:, o.index]))
        else:
            v = rows[:, o.index]
        return v

    def score_batch(self, images: Sequence[np.ndarray], prompts: Sequence[str],
                    metadata: Sequence[Mapping[str, str]]) -> tuple[list[float], Details]:
        check_lengths(images, prompts, metadata)
        x = np.stack([self.preprocess(im) for im in images]).astype(self.dtype, copy=False)
        if self.fixed_batch:
            outs = [self.session.run([self.output_name], {self.input_name: x[i:i + 1]})[0] for i in range(len(x))]
            out = np.concatenate([np.asarray(r).reshape(1, -1) for r in outs])
        else:
            out = np.asarray(self.session.run([self.output_name], {self.input_name: x})[0])
        if out.shape[0] != len(images):
            raise ValueError(f"model returned {out.shape[0]} rows for {len(images)} images")
        v = self._map(out)
        scores = self.options.scale * v + self.options.offset
        return [float(s) for s in scores], {"value": [float(a) for a in v]}
