"""Write the prompt files of the SD3.5-M recipes (deploy/configs/sd35m-ocr.yaml, sd35m-geneval.yaml):

    python scripts/make_prompt_data.py [--out deploy/data]

- ocr-train.jsonl / ocr-eval.jsonl: text-rendering prompts with the target text quoted in the prompt
  and in the metadata the OCR reward reads, {"prompt": "A neon sign that says \"Open Late\"",
  "metadata": {"text": "Open Late"}}. The eval texts never occur in the train file.
- geneval-train.jsonl / geneval-eval.jsonl: GenEval-style counting prompts for the detector reward
  (its default cascade counts frontal faces), {"prompt": "a photo of three friends at a cafe, facing
  the camera", "metadata": {"count": "3"}}. Eval (subject, setting) pairs never occur in train.

Deterministic (fixed word lists, a seeded shuffle): running it again writes the same bytes, which a
test checks (tests/test_recipes.py). Only the standard library.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
from pathlib import Path

SEED = 17
OCR_TRAIN, OCR_EVAL = 384, 64
COUNT_TRAIN, COUNT_EVAL = 320, 64

OCR_TEMPLATES = (
    'A neon sign that says "{t}"',
    'A wooden signboard with the words "{t}" painted on it',
    'A coffee mug printed with "{t}"',
    'A street sign reading "{t}"',
    'A white T-shirt with the slogan "{t}"',
    'A chalkboard outside a cafe that says "{t}"',
    'A birthday cake with "{t}" written in icing',
    'A book cover titled "{t}"',
    'A storefront banner that reads "{t}"',
    'A handwritten note on yellow paper saying "{t}"',
    'A vintage poster with the headline "{t}"',
    'A license plate that says "{t}"',
    'A protest placard reading "{t}"',
    'A glowing billboard at night that says "{t}"',
    'A doormat with the words "{t}"',
    'A sticker on a laptop that says "{t}"',
)
ADJECTIVES = (
    "Open", "Fresh", "Happy", "Golden", "Silent", "Wild", "Little", "Blue", "Lucky", "Sunny", "Brave",
    "Quiet", "Midnight", "Urban", "Cosmic", "Sweet", "Rainy", "Electric", "Gentle", "Crazy", "Ancient",
    "Frozen", "Hidden", "Bright",
)
NOUNS = (
    "Bakery", "Garden", "Coffee", "Dreams", "River", "Market", "Station", "Books", "Pizza", "Forest",
    "Music", "Harbor", "Kitchen", "Studio", "Planet", "Island", "Library", "Circus", "Bridge", "Valley",
    "Tigers", "Robots", "Cinema", "Diner",
)
PHRASES = (
    "Hello World", "Welcome Home", "No Parking", "Stay Curious", "Open Late", "Keep Out", "Good Vibes",
    "Push", "Pull", "Exit", "Sale", "Closed", "Thank You", "Be Kind", "Dream Big", "Enjoy Life",
    "Wet Paint", "Free Wifi", "Hot Tea", "Fresh Bread", "Gift Shop", "Quiet Please", "Danger", "Love",
)

COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
SUBJECTS = (  # (singular, plural) of people whose faces the detector can count
    ("person", "people"), ("friend", "friends"), ("child", "children"), ("student", "students"),
    ("musician", "musicians"), ("coworker", "coworkers"), ("athlete", "athletes"), ("chef", "chefs"),
    ("doctor", "doctors"), ("tourist", "tourists"), ("dancer", "dancers"), ("grandparent", "grandparents"),
)
SETTINGS = (
    "at a cafe", "in a park", "on a beach", "in an office", "at a train station", "in a classroom",
    "in a kitchen", "on a city street", "at a concert", "in a library", "on a mountain trail",
    "in a living room", "at a market", "by a lake",
)
COUNT_TEMPLATES = (
    "a photo of {n} {s} {where}, facing the camera",
    "a portrait photo of {n} {s} {where}, looking at the camera",
    "a close-up group photo of {n} {s} {where}, faces clearly visible",
)


def ocr_items() -> tuple[list[dict], list[dict]]:
    texts = sorted({*PHRASES, *ADJECTIVES, *NOUNS, *(f"{a} {n}" for a, n in itertools.product(ADJECTIVES, NOUNS))})
    rng = random.Random(SEED)
    rng.shuffle(texts)
    held_out = texts[:OCR_EVAL]
    train_texts = texts[OCR_EVAL:OCR_EVAL + OCR_TRAIN]

    def item(text: str) -> dict:
        prompt = rng.choice(OCR_TEMPLATES).format(t=text)
        return {"prompt": prompt, "metadata": {"text": text}}

    return [item(t) for t in train_texts], [item(t) for t in held_out]


def count_items() -> tuple[list[dict], list[dict]]:
    pairs = list(itertools.product(range(len(SUBJECTS)), range(len(SETTINGS))))
    rng = random.Random(SEED + 1)
    rng.shuffle(pairs)
    held_out, train = pairs[:COUNT_EVAL // 2], pairs[COUNT_EVAL // 2:]

    def items(pairs: list[tuple[int, int]], n_items: int) -> list[dict]:
        out = []
        for i in range(n_items):
            subject, setting = pairs[i % len(pairs)]
            n = 1 + (i + i // len(pairs)) % len(COUNT_WORDS)  # counts 1-4 equally often, varied per pair
            noun = SUBJECTS[subject][0 if n == 1 else 1]
            template = COUNT_TEMPLATES[(i // len(pairs)) % len(COUNT_TEMPLATES)]
            out.append({"prompt": template.format(n=COUNT_WORDS[n], s=noun, where=SETTINGS[setting]),
                        "metadata": {"count": str(n)}})
        return out

    return items(train, COUNT_TRAIN), items(held_out, COUNT_EVAL)


def write_jsonl(path: Path, items: list[dict]) -> None:
    path.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "deploy" / "data"),
                        help="output folder (default: deploy/data)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, (train, held_out) in (("ocr", ocr_items()), ("geneval", count_items())):
        assert not {i["prompt"] for i in train} & {i["prompt"] for i in held_out}, name
        write_jsonl(out / f"{name}-train.jsonl", train)
        write_jsonl(out / f"{name}-eval.jsonl", held_out)
        print(f"{out / name}-train.jsonl: {len(train)} prompts, {out / name}-eval.jsonl: {len(held_out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
