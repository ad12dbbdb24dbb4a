"""The text world: short words on a plain sign, scored by OCR (the second built-in world).

Images are ``IMAGE_SIZE`` x ``IMAGE_SIZE`` RGB (uint8): one word of 3-4 letters, drawn in capitals
in one of ``INK_COLORS`` on the plain near-white ``BACKGROUND``, centred with a small random offset.

Prompt grammar (lower case)::

    prompt := 'a sign that says "' WORD '"'      WORD := 3-4 letters a-z from ``WORDS``

``parse_prompt`` returns the word (whitespace and case are tolerated; anything else is a ValueError).
Reward servers read the same word from the quotes (the OCR scorer's rule) or ``metadata["text"]``.

Splits (deterministic, by a salted SHA-256 rank of the word): eval = ``EVAL_FRACTION`` of the words
(both lengths in proportion), never trained on. Every letter still occurs in training, so the held-out
set tests generalisation to **unseen words made of seen letters**: the base model's text conditioning
is character-level (one token per letter, ``TEXT_TOKENIZER_CHARS``), so a new word is a new sequence
of known tokens; whole-word tokens would give held-out words tokens no image was ever paired with.

Rendering: letters on a fixed pitch (``PITCH_PX`` per letter, so letter i of a word always sits in
slot i), Pillow's built-in FreeType font (``ImageFont.load_default(size)``, shipped inside Pillow, so
no system font is needed) drawn at ``SUPERSAMPLE`` x and box-filtered down: antialiased like real
text. Identical bytes for the same (prompt, seed) on the same Pillow version.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache, lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

IMAGE_SIZE: int = 32
BACKGROUND: tuple[int, int, int] = (245, 245, 240)
INK_COLORS: dict[str, tuple[int, int, int]] = {
    "black": (25, 25, 25),
    "navy": (20, 40, 140),
    "maroon": (140, 25, 25),
}
"""Text colours (drawn uniformly per image; the prompt does not name one)."""
FONT_SIZE_PX: int = 10
"""Font size at output resolution (capitals are about 7 px tall)."""
PITCH_PX: float = 7.0
"""Horizontal distance between letter centres, pixels (fixed pitch: slot i holds letter i)."""
SUPERSAMPLE: int = 4
"""Letters are drawn at this multiple of the output size and box-filtered down (antialiasing)."""
JITTER_X_PX: int = 1
"""The word's centre moves by a uniform integer in [-JITTER_X_PX, JITTER_X_PX] horizontally."""
JITTER_Y_PX: int = 2
"""... and in [-JITTER_Y_PX, JITTER_Y_PX] vertically."""
MARGIN_ROWS: int = 8
"""Rows at the top and at the bottom that no render ever inks (the text band is the middle
IMAGE_SIZE - 2 x MARGIN_ROWS rows); ``background_clean`` measures them in samples."""
MIN_LETTERS, MAX_LETTERS = 3, 4
EVAL_FRACTION: float = 0.12
_SPLIT_SALT = "diffrl-text-split-v1"
TEMPLATE = 'a sign that says "{}"'
TEXT_TOKENIZER_CHARS: str = 'abcdefghijklmnopqrstuvwxyz"'
"""The characters of the base model's tokenizer (one token per character; no merges)."""

_PROMPT_RE = re.compile(r'^a sign that says "([a-z]+)"$')

WORDS: tuple[str, ...] = tuple("""
    ace act add age aid aim air all and ant any ape arc arm art ash ask ate axe bad bag ban bar bat
    bay bed bee beg bet bib bid big bin bit bow box boy bud bug bun bus but buy cab can cap car cat
    cow cry cub cup cut dad dam day den dew did dig dim dip doe dog dot dry due dug dye ear eat egg
    elf elk elm end era eve eye fan far fat fax fed fee few fig fin fir fit fix fly foe fog for fox
    fry fun fur gap gas gem get gig gum gun gut guy gym had ham has hat hay hen her hid him hip his
    hit hog hop hot how hub hue hug hut ice icy ink inn ion its ivy jam jar jaw jet jog joy jug keg
    key kid kin kit lab lad lag lap law lay led leg let lid lie lip lit log lot low mad man map mat
    may men met mix mob mop mud mug nap net new nod nor not now nut oak oar oat odd off oil old one
    orb ore our out owl own pad pal pan paw pay pea peg pen pet pie pig pin pit pod pop pot pub pun
    pup put rag ram ran rat raw ray red rib rid rig rim rip rob rod rot row rub rug rum run rye sad
    sag sap sat saw say sea see set sew shy sip sir sit six ski sky sly sob sod son sow soy spa spy
    sub sum sun tab tag tan tap tar tax tea ten tie tin tip toe ton top toy try tub tug two urn use
    van vat vet via vow wag war was wax way web wed wet who why wig win wit wok won yak yam yes yet
    zip zoo able acid aged also area army away baby back bake ball band bank barn base bath bead
    beam bean bear beat beef bell belt bend best bike bill bird bite blow blue boat body bold bolt
    bone book boot born boss both bowl bulb bull burn bush busy cafe cake calm came camp card care
    cart case cash cast cave cell chef chip city clay clip club coal coat code coin cold come cook
    cool cope copy cord core corn cost crab crew crop cube cure cute dark dart data date dawn deal
    dear deck deep deer desk dial dice diet dish dive dock does doll dome done door dose dove down
    drag draw drop drum duck dune dusk dust duty each earn ease east easy echo edge epic even exam
    exit face fact fade fair fall fame farm fast fear feed feel fern file fill film find fine fire
    firm fish fist five flag flat flip flow foam fold folk food foot fork form fort four free frog
    from fuel full fund gate gear gift girl give glad glow glue goal goat gold golf good gown grab
    gray grew grid grin grip grow gulf hair half hall hand harp hawk head heal heat help herb hero
    hide high hike hill hint hold hole home hood hook hope horn hose host hour huge hunt idea inch
    iron item jazz jeep join joke jump jury just keen keep kelp kept kick kind king kiss kite knee
    knot know lace lady lake lamb lamp land lane last late lawn lead leaf lean left lens life lift
    like lily lime line link lion list live load loaf lock loft logo long look loop lord love luck
    lung made mail main make mall many mask mast meal meat meet melt menu mild milk mind mine mint
    mist mode mole monk mood moon more moss most moth move much mule must myth nail name navy near
    neat neck need nest news next nice nine node noon nose note oval oven over pack page paid pail
    pain pair palm park part past path peak pear pick pine pink pipe plan play plot plug plum poem
    poet pole pond pony pool port post pour pray pull pump pure push quiz race rack raft rail rain
    ramp rank rare read real reef rest rice rich ride ring ripe rise risk road roar robe rock role
    roll roof room root rope rose ruby rule rush safe sage sail salt same sand save seal seat seed
    seek sell send ship shoe shop shot show sick side sign silk sing sink site size skin skip slow
    snow soap sock soft soil sold sole song soon soup sour spin spot star stay stem step stop suit
    sure swan swim tail take tale talk tall tank tape task team tent term test text than that them
    then they thin tide tile time tiny tire toad told tone tool tour town tree trim trip tube tuna
    tune turn twin type unit upon used vase vast verb very vest view vine void vote wade wage wait
    wake walk wall want warm wash wave weak wear week well went west what when whip wide wife wild
    will wind wine wing wire wise wish wolf wood wool word work worm wrap yard yarn year yell yoga
    yolk zero zinc zone zoom
""".split())  # noqa: SIM905 (a word list reads best as text)
"""Common English words of 3-4 letters (868): the vocabulary of the world."""


# --------------------------------------------------------------------------------------------
# Grammar and splits
# --------------------------------------------------------------------------------------------


def format_prompt(word: str) -> str:
    """The prompt asking for ``word`` (``parse_prompt(format_prompt(w)) == w``)."""
    _check_word(word, f"word {word!r}")
    return TEMPLATE.format(word)


def _check_word(word: str, where: str) -> None:
    if not re.fullmatch(r"[a-z]+", word):
        raise ValueError(f"{where}: expected lower-case letters a-z only")
    if not MIN_LETTERS <= len(word) <= MAX_LETTERS:
        raise ValueError(f"{where}: expected {MIN_LETTERS}-{MAX_LETTERS} letters, got {len(word)}")


def parse_prompt(prompt: str) -> str:
    """The word of a prompt of the grammar; ValueError on anything else (case and repeated spaces
    are tolerated; curly quotes are read as straight ones)."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    text = " ".join(prompt.lower().split()).replace("\u201c", '"').replace("\u201d", '"')
    m = _PROMPT_RE.match(text)
    if m is None:
        raise ValueError(f'prompt {prompt!r}: expected \'a sign that says "<word>"\' with a word of '
                         f"{MIN_LETTERS}-{MAX_LETTERS} letters a-z")
    _check_word(m.group(1), f"prompt {prompt!r}")
    return m.group(1)


def _rank(word: str) -> str:
    return hashlib.sha256(f"{_SPLIT_SALT}:{word}".encode()).hexdigest()


@lru_cache(maxsize=1)
def _splits() -> tuple[tuple[str, ...], tuple[str, ...]]:
    held: set[str] = set()
    for n in range(MIN_LETTERS, MAX_LETTERS + 1):  # the same fraction of each length
        words = sorted((w for w in WORDS if len(w) == n), key=_rank)
        held.update(words[: round(EVAL_FRACTION * len(words))])
    train_letters = set("".join(w for w in WORDS if w not in held))
    held = {w for w in held if set(w) <= train_letters}  # a letter seen only held out is not "seen"
    train = tuple(w for w in WORDS if w not in held)
    evals = tuple(w for w in WORDS if w in held)
    assert set("".join(train)) == set("".join(WORDS)), "every letter must occur in training"
    return train, evals


def train_words() -> list[str]:
    return list(_splits()[0])


def eval_words() -> list[str]:
    """Held-out words (fixed, deterministic, disjoint from ``train_words``)."""
    return list(_splits()[1])


def split_prompts(split: str) -> list[str]:
    """The prompts of a split: 'train', 'eval' (held out) or 'all'."""
    words = {"train": train_words, "eval": eval_words, "all": lambda: list(WORDS)}[split]()
    return [TEMPLATE.format(w) for w in words]


def split_sizes() -> dict[str, int]:
    tr, ev = _splits()
    return {"all": len(WORDS), "train": len(tr), "eval": len(ev),
            "eval_3_letters": sum(len(w) == 3 for w in ev), "eval_4_letters": sum(len(w) == 4 for w in ev)}


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sign:
    """One render's random choices: the ink colour and the word centre's offset (pixels)."""

    word: str
    ink: str
    dx: int
    dy: int


def sample_sign(word: str, rng: np.random.Generator) -> Sign:
    ink = list(INK_COLORS)[int(rng.integers(len(INK_COLORS)))]
    dx = int(rng.integers(-JITTER_X_PX, JITTER_X_PX + 1))
    dy = int(rng.integers(-JITTER_Y_PX, JITTER_Y_PX + 1))
    return Sign(word, ink, dx, dy)


@cache
def _font() -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=FONT_SIZE_PX * SUPERSAMPLE)


@cache
def _coverage(word: str, dx: int, dy: int) -> np.ndarray:
    """float32 [IMAGE_SIZE, IMAGE_SIZE] ink coverage in [0, 1] of ``word`` at offset (dx, dy)."""
    s = SUPERSAMPLE
    big = Image.new("L", (IMAGE_SIZE * s, IMAGE_SIZE * s), 0)
    draw = ImageDraw.Draw(big)
    left = IMAGE_SIZE / 2 + dx - PITCH_PX * len(word) / 2
    for i, letter in enumerate(word.upper()):
        centre = (left + PITCH_PX * (i + 0.5)) * s, (IMAGE_SIZE / 2 + dy) * s
        draw.text(centre, letter, fill=255, font=_font(), anchor="mm")
    cover = np.asarray(big.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX), dtype=np.float32) / 255.0
    cover.setflags(write=False)
    return cover


def render(sign: Sign, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 [IMAGE_SIZE, IMAGE_SIZE, 3] RGB: the background blended towards the ink by coverage."""
    cover = _coverage(sign.word, sign.dx, sign.dy)[..., None]  # [H, W, 1]
    bg, ink = np.array(BACKGROUND, np.float32), np.array(INK_COLORS[sign.ink], np.float32)
    img = np.rint(bg + cover * (ink - bg)).astype(np.uint8)
    if out is None:
        return img
    out[...] = img
    return out


def render_prompt(prompt: str, seed: int) -> np.ndarray:
    """Render ``prompt``'s word; identical bytes for the same (prompt, seed)."""
    return render(sample_sign(parse_prompt(prompt), np.random.default_rng(seed)))


def render_batch(prompts: Sequence[str], seeds: Sequence[int]) -> np.ndarray:
    """uint8 [B, IMAGE_SIZE, IMAGE_SIZE, 3]; image i is ``render_prompt(prompts[i], seeds[i])``."""
    if len(prompts) != len(seeds):
        raise ValueError(f"render_batch: {len(prompts)} prompts but {len(seeds)} seeds")
    out = np.empty((len(prompts), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for i, (p, s) in enumerate(zip(prompts, seeds)):
        render(sample_sign(parse_prompt(p), np.random.default_rng(int(s))), out=out[i])
    return out
