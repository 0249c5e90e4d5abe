"""Builds planer/data/calibration_en.txt, the bundled calibration corpus, from WordNet 3.0.

WordNet's glosses carry usage examples in double quotes ("After his accident, he had to
restructure his life"). This keeps the ones that read as whole sentences (a capital first
letter, at least six words, no `--Author` attribution), drops duplicates, and draws a
seeded sample: every noun, adjective and adverb example that qualifies (there are few)
and verb examples for the rest. Licence: WordNet 3.0 licence (permissive, BSD-like),
reproduced in planer/data/CALIBRATION_SOURCE.md, which must travel with the text.

    apt-get download wordnet-base && dpkg-deb -x wordnet-base_*.deb wn
    python scripts/calibration_corpus.py wn/usr/share/wordnet planer/data/calibration_en.txt
"""

from __future__ import annotations

import argparse
import random
import re
from pathlib import Path

PARTS = ("noun", "verb", "adj", "adv")
SIZE = 3000
MIN_WORDS = 6


def examples(wordnet: Path) -> dict[str, list[str]]:
    """Returns each part of speech's whole-sentence usage examples, deduplicated, in file order."""
    seen: set[str] = set()
    found: dict[str, list[str]] = {part: [] for part in PARTS}
    for part in PARTS:
        for line in (wordnet / f"data.{part}").read_text(encoding="latin-1").splitlines():
            if line.startswith("  ") or "|" not in line:  # the licence header, not a synset
                continue
            for text in re.findall(r'"([^"]+)"', line.split("|", 1)[1]):
                text = text.strip()
                if (text[:1].isupper() and len(text.split()) >= MIN_WORDS and "--" not in text
                        and text not in seen):
                    seen.add(text)
                    found[part].append(text)
    return found


def main() -> None:
    """Writes the corpus and prints how many sentences each part of speech offered."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wordnet", type=Path, help="folder holding data.noun, data.verb, ...")
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    found = examples(args.wordnet)
    chosen = [text for part in ("noun", "adj", "adv") for text in found[part]]
    rng = random.Random(0)
    chosen += rng.sample(found["verb"], SIZE - len(chosen))
    rng.shuffle(chosen)
    args.out.write_text("\n".join(chosen) + "\n", encoding="utf-8")
    print(f"{len(chosen)} sentences ({', '.join(f'{p} {len(v)}' for p, v in found.items())} "
          f"available) -> {args.out}")


if __name__ == "__main__":
    main()
