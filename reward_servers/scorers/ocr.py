"""``ocr``: does the image show the text quoted in the prompt? (the Flow-GRPO OCR reward)

Target text: the first double-quoted span of the prompt (``a sign that says "hello"`` -> ``hello``;
curly quotes are accepted), or ``metadata["text"]`` when given. A prompt without either is refused
(422). Both the target and the recognised text are lowercased and stripped of all whitespace.

Score (``scorer.metric``):

- ``flow_grpo`` (default, as Flow-GRPO's ``flow_grpo/ocr.py``): distance = 0 if the target occurs
  inside the recognised text, else the Levenshtein distance, capped at len(target);
  score = 1 - distance / len(target), in [0, 1]. Extra recognised characters around a correct
  word are not penalised.
- ``normalized``: score = 1 - Levenshtein(recognised, target) / max(len(target), len(recognised)),
  in [0, 1]; extra characters are penalised.

Details per item: ``distance`` (the raw Levenshtein distance, before the cap) and ``chars_read``.
Pass threshold 1.0: the text was read exactly (distance 0).

Engine: Tesseract 5 (the Debian ``tesseract-ocr`` binary). Rather than one process per image
(pytesseract: ~80-250 ms each, mostly process start and model load), a whole batch goes to ONE
``tesseract stdin stdout`` call as a multi-page TIFF (greyscale, uncompressed); tesseract writes
one page's text after another, separated by form feeds, so page i is image i (the page count is
checked). ``scorer.parallel`` splits a batch over several such calls running at once. Images whose
grey levels span less than ``blank_contrast`` are read as "" without calling the engine (tesseract
hallucinates characters on blank pages). tesserocr (a persistent binding) needs compiling against
libtesseract-dev and is not used; RapidOCR (rapidocr-onnxruntime, models inside its wheel) is only the
text world's held-out judge (diffrl/text_eval.py). Small images are enlarged first (``upscale``).
"""

from __future__ import annotations

import io
import itertools
import os
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image

from diffrl.config import require
from diffrl.reward_servers.scorers.base import Details, Scorer, check_lengths

_QUOTED = re.compile(r'"([^"]*)"')
_CURLY = str.maketrans({"\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"'})
_WS = re.compile(r"\s+")
MIN_OCR_SIDE = 128
"""With ``upscale: 0``, images whose shorter side is below this many pixels are enlarged to reach it."""


@dataclass
class OcrOptions:
    metric: str = "flow_grpo"
    """flow_grpo (target contained = exact; distance capped at len(target)) or normalized
    (1 - distance / max(len(target), len(read)))."""
    psm: int = 7
    """Tesseract page segmentation mode: 7 = one text line (generated signs and captions), 6 = a
    block of text, 11 = sparse text."""
    lang: str = "eng"
    """Tesseract language(s), e.g. eng or eng+deu (traineddata must be installed)."""
    tesseract_cmd: str = "tesseract"
    """The tesseract executable (a name on PATH or a path)."""
    parallel: int = 1
    """Tesseract processes per scorer call (the batch is split between them)."""
    timeout_s: float = 120.0
    """Timeout of one tesseract call, seconds."""
    blank_contrast: int = 16
    """Images whose grey range (max - min) is below this are read as empty text."""
    text_key: str = "text"
    """Metadata key that, when present, gives the target text instead of the prompt's quotes."""
    upscale: int = 0
    """Resize factor (bicubic) applied before recognition; 0 = auto: images whose shorter side is
    under ``MIN_OCR_SIDE`` px are enlarged by the smallest integer factor that reaches it (tesseract
    reads 32 px signs reliably only enlarged: docs/text_world.md), larger ones are read as they are."""

    def validate(self) -> None:
        require(self.metric in ("flow_grpo", "normalized"), "metric", "flow_grpo or normalized", self.metric)
        require(0 <= self.psm <= 13, "psm", "a tesseract page segmentation mode in [0, 13]", self.psm)
        require(re.fullmatch(r"[A-Za-z_]+(\+[A-Za-z_]+)*", self.lang) is not None, "lang",
                "tesseract language codes like eng or eng+deu", self.lang)
        require(self.parallel >= 1, "parallel", "an int >= 1", self.parallel)
        require(self.timeout_s > 0, "timeout_s", "a float > 0", self.timeout_s)
        require(0 <= self.upscale <= 16, "upscale", "an int in [0, 16] (0 = auto)", self.upscale)


def target_text(prompt: str, metadata: Mapping[str, str], key: str = "text") -> str | None:
    """The text the image should show: ``metadata[key]`` or the first "quoted" span of the prompt."""
    if key in metadata:
        return metadata[key]
    m = _QUOTED.search(prompt.translate(_CURLY))
    return m.group(1) if m else None


def normalize(text: str) -> str:
    return _WS.sub("", text).lower()


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def ocr_score(read: str, target: str, metric: str = "flow_grpo") -> tuple[float, int]:
    """(score, raw distance) of recognised text ``read`` against ``target`` (both unnormalised)."""
    pred, gt = normalize(read), normalize(target)
    if not gt:
        raise ValueError("empty target text")
    dist = levenshtein(pred, gt)
    if metric == "flow_grpo":
        capped = 0 if gt in pred else min(dist, len(gt))
        return 1.0 - capped / len(gt), dist
    return 1.0 - dist / max(len(gt), len(pred)), dist


class TesseractEngine:
    """Reads many images with one tesseract process call (multi-page TIFF on stdin)."""

    def __init__(self, options: OcrOptions):
        self.options = options
        exe = shutil.which(options.tesseract_cmd)
        if exe is None:
            raise RuntimeError(f"the OCR reward needs tesseract: {options.tesseract_cmd!r} is not on PATH "
                               "(install the tesseract-ocr package, e.g. apt-get install tesseract-ocr)")
        self.exe = exe
        self.env = {**os.environ, "OMP_THREAD_LIMIT": "1"}  # one core per process; parallelism is ours
        self._pool = ThreadPoolExecutor(options.parallel, thread_name_prefix="tesseract") \
            if options.parallel > 1 else None
        self.version = self._version()

    def _version(self) -> str:
        out = subprocess.run([self.exe, "--version"], capture_output=True, text=True, timeout=30, env=self.env,
                             check=False)
        first = (out.stdout or out.stderr).splitlines()[0] if (out.stdout or out.stderr) else "tesseract"
        return first.strip()

    def read(self, images: Sequence[np.ndarray]) -> list[str]:
        texts = [""] * len(images)
        todo: list[int] = []
        greys: list[Image.Image] = []
        for i, im in enumerate(images):
            g = Image.fromarray(np.asarray(im)).convert("L")
            lo, hi = g.getextrema()
            if hi - lo >= self.options.blank_contrast:
                todo.append(i)
                greys.append(self._enlarge(g))
        if not todo:
            return texts
        n = min(self.options.parallel, len(todo))
        if self._pool is None or n == 1:
            chunks = [list(range(len(todo)))]
            outs = [self._read_pages(greys)]
        else:  # contiguous chunks, one tesseract process each
            bounds = np.linspace(0, len(todo), n + 1).round().astype(int)
            chunks = [list(range(a, b)) for a, b in itertools.pairwise(bounds)]
            outs = list(self._pool.map(lambda c: self._read_pages([greys[j] for j in c]), chunks))
        for chunk, out in zip(chunks, outs):
            for j, text in zip(chunk, out):
                texts[todo[j]] = text
        return texts

    def _enlarge(self, grey: Image.Image) -> Image.Image:
        factor = self.options.upscale or max(1, -(-MIN_OCR_SIDE // min(grey.size)))
        return grey if factor == 1 else grey.resize((grey.width * factor, grey.height * factor), Image.BICUBIC)

    def _read_pages(self, pages: list[Image.Image]) -> list[str]:
        buf = io.BytesIO()
        pages[0].save(buf, format="TIFF", save_all=True, append_images=pages[1:], compression="raw")
        cmd = [self.exe, "stdin", "stdout", "--psm", str(self.options.psm), "-l", self.options.lang]
        proc = subprocess.run(cmd, input=buf.getvalue(), capture_output=True, timeout=self.options.timeout_s,
                              env=self.env, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"tesseract exited with {proc.returncode}: "
                               f"{proc.stderr.decode(errors='replace').strip()[-300:]}")
        out = proc.stdout.decode("utf-8", errors="replace").split("\f")
        if len(out) == len(pages) + 1 and not out[-1].strip():  # a trailing separator
            out = out[:-1]
        if len(out) != len(pages):
            raise RuntimeError(f"tesseract returned {len(out)} pages of text for {len(pages)} images")
        return [t.strip() for t in out]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)


class OcrScorer(Scorer):
    name = "ocr"
    min_score = 0.0
    max_score = 1.0
    higher_is_better = True
    pass_threshold = 1.0  # the quoted text read exactly (distance 0)
    needs_prompt = False  # metadata["text"] may stand in for the prompt; check_item decides
    Options = OcrOptions

    def __init__(self, options: OcrOptions | None = None):
        self.options = options or OcrOptions()
        self.engine = TesseractEngine(self.options)
        self.version = f"1 ({self.engine.version}, psm {self.options.psm}, {self.options.lang})"
        self.description = (f"1 - normalised edit distance between tesseract's reading and the prompt's "
                            f"quoted text (metric {self.options.metric}); details: distance, chars_read")

    def check_item(self, prompt: str, metadata: Mapping[str, str]) -> str | None:
        text = target_text(prompt, metadata, self.options.text_key)
        if text is None:
            return (f'prompt text with the target in double quotes (a sign that says "hello") or '
                    f'metadata[{self.options.text_key!r}] is required by this reward')
        if not normalize(text):
            return "the target text is empty"
        return None

    def score_batch(self, images: Sequence[np.ndarray], prompts: Sequence[str],
                    metadata: Sequence[Mapping[str, str]]) -> tuple[list[float], Details]:
        check_lengths(images, prompts, metadata)
        targets = []
        for p, m in zip(prompts, metadata):
            problem = self.check_item(p, m)
            if problem:
                raise ValueError(problem)
            targets.append(target_text(p, m, self.options.text_key))
        texts = self.engine.read(images)
        scores, dists = [], []
        for read, target in zip(texts, targets):
            s, d = ocr_score(read, target, self.options.metric)
            scores.append(s)
            dists.append(float(d))
        return scores, {"distance": dists, "chars_read": [float(len(normalize(t))) for t in texts]}

    def read_text(self, images: Sequence[np.ndarray]) -> list[str]:
        """The raw recognised text of each image (for debugging and tests)."""
        return self.engine.read(images)

    def close(self) -> None:
        self.engine.close()
