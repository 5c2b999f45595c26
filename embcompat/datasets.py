"""Labelled retrieval data from Debian packages, and an on-disk embedding cache.

WordNet task (labels come from WordNet, not from either model):
- document = a synset as "lemma1, lemma2: definition";
- query = one of its quoted example sentences; its relevant document is its synset;
- gallery = the answers of the queries plus other synsets; `pool` holds synsets outside
  the gallery (disjoint material for fitting pairs or probes).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from embcompat.errors import InvalidInput

WORDNET_DIR = Path("/usr/share/wordnet")
POS_FILES = ("noun", "verb", "adj", "adv")
_EXAMPLE = re.compile(r'"([^"]+)"')
_ADJ_MARKER = re.compile(r"\([a-z]+\)$")


@dataclass(frozen=True)
class Synset:
    id: str
    lemmas: tuple[str, ...]
    definition: str
    examples: tuple[str, ...]

    @property
    def document(self) -> str:
        return f"{', '.join(self.lemmas)}: {self.definition}"


@dataclass(frozen=True)
class RetrievalTask:
    """queries[i] is relevant to gallery[relevant[i]]."""

    queries: list[str]
    relevant: npt.NDArray[np.int64]
    gallery: list[str]
    gallery_ids: list[str]
    pool: list[str]


def parse_wordnet_line(line: str, pos: str) -> Synset | None:
    """One line of a WordNet `data.*` file → a Synset (None for licence header lines)."""
    if line.startswith("  ") or " | " not in line:
        return None
    head, gloss = line.split(" | ", 1)
    tokens = head.split()
    count = int(tokens[3], 16)
    lemmas = tuple(_ADJ_MARKER.sub("", w).replace("_", " ") for w in tokens[4 : 4 + 2 * count : 2])
    examples = tuple(e.strip() for e in _EXAMPLE.findall(gloss) if len(e.split()) >= 3)
    definition = _EXAMPLE.sub("", gloss).strip().strip(";").strip()
    definition = re.sub(r"(\s*;\s*)+", "; ", definition).strip("; ")
    return Synset(f"{pos}:{tokens[0]}", lemmas, definition, examples)


def load_wordnet(root: Path = WORDNET_DIR) -> list[Synset]:
    files = [root / f"data.{pos}" for pos in POS_FILES]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise InvalidInput(
            f"WordNet data files are missing: {', '.join(missing)}",
            hint="apt-get install -y wordnet-base (make install does it)",
        )
    synsets: list[Synset] = []
    for pos, path in zip(POS_FILES, files, strict=True):
        with path.open(encoding="utf-8", errors="replace") as fh:
            synsets.extend(s for s in (parse_wordnet_line(ln, pos) for ln in fh) if s)
    return synsets


def wordnet_task(
    n_queries: int = 3000, n_gallery: int = 12000, n_pool: int = 0, seed: int = 0
) -> RetrievalTask:
    """The WordNet retrieval task of DATA.md, deterministic for a seed."""
    if n_gallery < n_queries:
        raise InvalidInput(f"gallery ({n_gallery}) must hold the {n_queries} answers")
    synsets = load_wordnet()
    rng = np.random.default_rng(seed)
    with_examples = [i for i, s in enumerate(synsets) if s.examples and s.definition]
    answers = rng.choice(with_examples, size=n_queries, replace=False)
    taken = set(answers.tolist())
    others = np.array([i for i in range(len(synsets)) if i not in taken and synsets[i].definition])
    rng.shuffle(others)
    distractors = others[: n_gallery - n_queries]
    pool = others[n_gallery - n_queries : n_gallery - n_queries + n_pool]
    order = rng.permutation(np.concatenate([answers, distractors]))
    position = {int(s): i for i, s in enumerate(order)}
    queries = [synsets[a].examples[rng.integers(len(synsets[a].examples))] for a in answers]
    return RetrievalTask(
        queries=queries,
        relevant=np.array([position[int(a)] for a in answers], np.int64),
        gallery=[synsets[i].document for i in order],
        gallery_ids=[synsets[i].id for i in order],
        pool=[synsets[i].document for i in pool],
    )


def wordnet_pairs(exclude: Sequence[str], n_pairs: int, seed: int = 0) -> list[tuple[str, str]]:
    """(example sentence, synset document) training pairs from synsets outside `exclude`
    (an evaluation gallery's synset ids), so no evaluation document is trained on; up
    to `n_pairs`, every example of a drawn synset kept (several queries per document)."""
    taken = set(exclude)
    synsets = [s for s in load_wordnet() if s.examples and s.definition and s.id not in taken]
    order = np.random.default_rng(seed).permutation(len(synsets))
    pairs: list[tuple[str, str]] = []
    for i in order:
        pairs.extend((e, synsets[i].document) for e in synsets[i].examples)
        if len(pairs) >= n_pairs:
            break
    return pairs[:n_pairs]


def cached_encode(
    name: str,
    texts: Sequence[str],
    encode: Callable[[Sequence[str]], npt.NDArray[np.float32]],
    cache_dir: Path,
) -> npt.NDArray[np.float32]:
    """Encode once per (model, texts); the .npy is written to a temp file then renamed."""
    digest = hashlib.sha256("\x1f".join([name, *texts]).encode()).hexdigest()[:20]
    path = cache_dir / f"{name}-{digest}.npy"
    if path.exists():
        return np.load(path)
    vectors = np.ascontiguousarray(encode(texts), dtype=np.float32)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=cache_dir, suffix=".tmp", delete=False) as tmp:
        np.save(tmp, vectors)
        tmp.flush()
        os.fsync(tmp.fileno())
    os.replace(tmp.name, path)
    return vectors
