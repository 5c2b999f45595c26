"""Compatible fine-tuning of a sentence-transformer: a v2 whose queries search v1's gallery.

The seed papers train image models; the same recipe for a text encoder, through the
library's own trainer (`SentenceTransformerTrainer`) and loss interface:
- the v2 body (any sentence-transformer) gets a linear head (a `Dense` module) into
  d_old + extra_dims coordinates (BT²): the first d_old are trained to be comparable
  with v1's stored vectors, the extra ones are free, so an old vector zero-padded is a
  point of the new space and the `basis` plan serves the old gallery unchanged;
- the head starts as an orthogonal Procrustes map from v2's features to v1's on the
  training documents (first d_old rows) and v2's principal directions (extra rows), so
  training starts from a working bridge instead of noise;
- `CompatibleLoss` sums, with weights: `new` (in-batch contrastive, v2 queries against
  v2 documents on every coordinate), `influence` (BCT adapted to retrieval: v1's vectors
  of every training document are the frozen classifier, and a v2 query's head must
  classify its own document), `contrast` (the same against the batch's documents only)
  and `align` (OCA: a v2 document's head near v1's vector of it);
- `orthogonal` (OCA) adds a square `Dense` kept orthogonal after every optimiser step,
  so the compatibility terms rotate the space without bending v2's own geometry.
v1 never runs during training: its document vectors are computed once (or read from
the gallery) and passed in. Runs are deterministic for a seed, checkpoint every epoch,
resume from the last checkpoint, and keep the epoch with the best held-out score.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from embcompat.adapters.basis import zero_pad
from embcompat.adapters.metrics import recall_at_k, search
from embcompat.errors import InvalidInput
from embcompat.files import atomic_write

TEXT_METHODS = ("independent", "bct", "bt2", "oca")
LOSS_TERMS = ("new", "influence", "contrast", "align")
# Loss weights per method; `weights` in the config overrides them term by term.
TEXT_WEIGHTS: dict[str, dict[str, float]] = {
    "independent": {"new": 1.0},
    "bct": {"new": 1.0, "influence": 1.0},
    "bt2": {"new": 1.0, "influence": 1.0, "contrast": 1.0, "align": 1.0},
    "oca": {"new": 1.0, "contrast": 1.0, "align": 1.0},
}
SCALE = 20.0  # cosine logits' inverse temperature, as MultipleNegativesRankingLoss
INIT_SAMPLE = 2000  # documents encoded by v2 to initialise the head
HELDOUT_DISTRACTORS = 5000  # training documents beside the held-out ones, per evaluation
SIGNATURE = "signature.json"  # in a checkpoint folder: the inputs its checkpoints are of

FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True)
class TextPairs:
    """Training pairs: queries[i] is relevant to documents[doc_of[i]]; documents are
    unique, and old_docs[j] is v1's (stored or computed) vector of documents[j]."""

    queries: list[str]
    documents: list[str]
    doc_of: npt.NDArray[np.int64]
    old_docs: FloatArray

    def __post_init__(self) -> None:
        if len(self.queries) != len(self.doc_of):
            raise InvalidInput("every training query needs its document", field="pairs")
        if len(self.documents) != len(self.old_docs):
            raise InvalidInput("every training document needs v1's vector", field="pairs")
        if len(self.doc_of) and (self.doc_of.min() < 0 or self.doc_of.max() >= len(self.documents)):
            raise InvalidInput("a training pair points at no document", field="pairs")
        if not np.isfinite(self.old_docs).all():
            raise InvalidInput("v1's document vectors hold NaN or infinity", field="pairs")

    def split(self, val_fraction: float, seed: int) -> tuple[TextPairs, TextPairs]:
        """Held-out pairs by document, so validation documents were never trained on."""
        rng = np.random.default_rng(seed)
        docs = rng.permutation(len(self.documents))
        n_val = int(round(len(docs) * val_fraction))
        val_docs = np.zeros(len(self.documents), bool)
        val_docs[docs[:n_val]] = True
        return self._subset(~val_docs[self.doc_of]), self._subset(val_docs[self.doc_of])

    def _subset(self, keep: npt.NDArray[np.bool_]) -> TextPairs:
        used = np.unique(self.doc_of[keep])
        renumber = np.full(len(self.documents), -1, np.int64)
        renumber[used] = np.arange(len(used))
        return TextPairs(
            queries=[q for q, k in zip(self.queries, keep, strict=True) if k],
            documents=[self.documents[j] for j in used],
            doc_of=renumber[self.doc_of[keep]],
            old_docs=self.old_docs[used],
        )


def pairs_from_texts(
    rows: Sequence[tuple[str, str]],
) -> tuple[list[str], list[str], npt.NDArray[np.int64]]:
    """(query, document) rows → queries, unique documents, and each query's document row.
    Empty texts are refused by row number."""
    queries: list[str] = []
    documents: list[str] = []
    position: dict[str, int] = {}
    doc_of: list[int] = []
    for i, row in enumerate(rows):
        if len(row) != 2 or not all(isinstance(t, str) and t.strip() for t in row):
            raise InvalidInput(
                f"training pair {i} must be two non-empty texts (query, relevant item)",
                field="pairs",
            )
        query, doc = row
        queries.append(query)
        doc_of.append(position.setdefault(doc, len(position)))
        if doc_of[-1] == len(documents):
            documents.append(doc)
    if not queries:
        raise InvalidInput("no training pairs", field="pairs")
    return queries, documents, np.array(doc_of, np.int64)


@dataclass
class TextTrainConfig:
    """How a compatible model is trained; `check()` refuses a bad setting by name before
    any model is loaded, so a request fails at once rather than on a worker."""

    method: str = "bt2"
    extra_dims: int = 0
    weights: dict[str, float] = field(default_factory=dict)  # overrides TEXT_WEIGHTS
    orthogonal: bool = False  # OCA's orthogonal layer (default for `oca`)
    epochs: int = 1
    batch_size: int = 64
    lr: float = 5e-5  # the body's; the head learns at head_lr
    head_lr: float = 1e-3
    max_seq_length: int = 64
    val_fraction: float = 0.1
    patience: int = 1  # epochs without a better held-out score before stopping
    seed: int = 0
    checkpoint_dir: Path | None = None  # resumed from if it holds a checkpoint
    progress: bool = True

    def resolved_weights(self) -> dict[str, float]:
        if self.method not in TEXT_METHODS:
            raise InvalidInput(
                f"unknown compatible training method {self.method!r}",
                hint=f"one of {', '.join(TEXT_METHODS)}",
                field="method",
            )
        unknown = sorted(set(self.weights) - set(LOSS_TERMS))
        if unknown:
            raise InvalidInput(
                f"unknown loss terms {unknown}", hint=f"one of {', '.join(LOSS_TERMS)}"
            )
        w = {**TEXT_WEIGHTS[self.method], **self.weights}
        if any(not np.isfinite(v) or v < 0 for v in w.values()) or not any(w.values()):
            raise InvalidInput("loss weights must be finite, >= 0, and not all zero")
        return w

    def check(self) -> None:
        self.resolved_weights()
        for name in ("epochs", "batch_size", "max_seq_length"):
            if getattr(self, name) < 1:
                raise InvalidInput(f"{name} must be >= 1", field=name)
        if self.batch_size < 2:
            raise InvalidInput("batch_size must be >= 2 (in-batch negatives)", field="batch_size")
        if self.extra_dims < 0:
            raise InvalidInput(
                f"extra_dims must be >= 0, got {self.extra_dims}", field="extra_dims"
            )
        if self.method == "independent" and (self.extra_dims or self.orthogonal):
            raise InvalidInput("an independent model has no head: no extra_dims, no orthogonal")
        if not (0.0 < self.val_fraction < 0.5):
            raise InvalidInput("val_fraction must be in (0, 0.5)", field="val_fraction")
        if not (self.lr > 0 and self.head_lr > 0):
            raise InvalidInput("learning rates must be positive", field="lr")


@dataclass
class TextTrainResult:
    """The trained model and what the run measured (held-out R@10 per epoch)."""

    model: Any  # SentenceTransformer
    method: str
    d_old: int
    extra_dims: int
    weights: dict[str, float]
    history: list[dict[str, float]]
    best_score: float
    train_s: float
    resumed_from: str | None = None  # the checkpoint a stopped run went on from

    @property
    def dim(self) -> int:
        return int(self.model.get_embedding_dimension())


class CompatibleLoss(nn.Module):
    """The loss terms above over (query, document) columns; `label` is the pair's
    document row in `old_docs`, v1's frozen vectors of every training document."""

    def __init__(self, model: Any, old_docs: FloatArray, weights: dict[str, float]) -> None:
        super().__init__()
        self.model = model
        self.weights = weights
        self.old_docs: torch.Tensor
        self.register_buffer(
            "old_docs", nn.functional.normalize(torch.from_numpy(np.asarray(old_docs)), dim=1)
        )

    def forward(
        self, sentence_features: Sequence[dict[str, Any]], labels: torch.Tensor
    ) -> torch.Tensor:
        q, d = (self.model(f)["sentence_embedding"] for f in sentence_features)
        q, d = nn.functional.normalize(q, dim=1), nn.functional.normalize(d, dim=1)
        target = torch.arange(len(q), device=q.device)
        # the same document twice in a batch (several queries per document) is one
        # class: its other copies are not negatives of the query
        duplicate = (labels[:, None] == labels[None, :]) & ~torch.eye(
            len(q), dtype=torch.bool, device=q.device
        )
        w, d_old = self.weights, self.old_docs.shape[1]
        loss = q.sum() * 0.0
        if w.get("new"):
            logits = (SCALE * q @ d.T).masked_fill(duplicate, -1e4)
            loss = loss + w["new"] * nn.functional.cross_entropy(logits, target)
        if w.get("influence") or w.get("contrast") or w.get("align"):
            head_q = nn.functional.normalize(q[:, :d_old], dim=1)
            old = self.old_docs[labels]
            if w.get("influence"):
                logits = SCALE * head_q @ self.old_docs.T
                loss = loss + w["influence"] * nn.functional.cross_entropy(logits, labels)
            if w.get("contrast"):
                logits = (SCALE * head_q @ old.T).masked_fill(duplicate, -1e4)
                loss = loss + w["contrast"] * nn.functional.cross_entropy(logits, target)
            if w.get("align"):
                cos = nn.functional.cosine_similarity(d[:, :d_old], old, dim=1)
                loss = loss + w["align"] * (1 - cos).mean()
        return loss


def compatible_model(
    base: Any, pairs: TextPairs, extra_dims: int, orthogonal: bool, seed: int
) -> Any:
    """A copy of `base` with the head appended: Procrustes from v2's features to v1's on
    (a sample of) the training documents, then v2's top principal directions."""
    from sentence_transformers.models import Dense

    model = _copy(base)
    d_old = pairs.old_docs.shape[1]
    d_base = int(base.get_embedding_dimension())
    if extra_dims > d_base:
        raise InvalidInput(
            f"extra_dims ({extra_dims}) cannot exceed the base model's width ({d_base})",
            field="extra_dims",
        )
    rng = np.random.default_rng(seed)
    sample = rng.permutation(len(pairs.documents))[:INIT_SAMPLE]
    feats = model.encode(
        [pairs.documents[i] for i in sample], batch_size=128, convert_to_numpy=True
    )
    old = pairs.old_docs[sample]
    u, _, vt = np.linalg.svd(feats.T @ old, full_matrices=False)  # (d_base, d_old) Procrustes
    rows = [(u @ vt).T]  # (d_old, d_base): head · f ≈ v1's vector
    if extra_dims:
        centred = feats - feats.mean(0)
        rows.append(np.linalg.svd(centred, full_matrices=False)[2][:extra_dims])
    weight = torch.tensor(np.concatenate(rows), dtype=torch.float32)
    head = Dense(
        d_base, d_old + extra_dims, bias=False, activation_function=None, init_weight=weight
    )
    model.append(head)
    if orthogonal:
        dim = d_old + extra_dims
        model.append(
            Dense(dim, dim, bias=False, activation_function=None, init_weight=torch.eye(dim))
        )
    return model


def _copy(model: Any) -> Any:
    """An independent copy through save/load (the library's own round trip)."""
    from sentence_transformers import SentenceTransformer

    with tempfile.TemporaryDirectory() as tmp:
        model.save(tmp)
        return SentenceTransformer(tmp, device="cpu", trust_remote_code=False)


def recall_at_10(
    queries: FloatArray, gallery: FloatArray, relevant: npt.NDArray[np.int64]
) -> float:
    """Share of queries whose relevant gallery row is among their 10 best by cosine.
    queries: (n, d), gallery: (m, d), relevant: (n,) gallery rows (FAISS's exact search
    works through a large set in blocks)."""
    if not len(queries):
        return 0.0
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True).clip(1e-12)
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True).clip(1e-12)
    return recall_at_k(search(q, g, 10)[1], relevant, 10)


def _evaluator(val: TextPairs, distractors: TextPairs, compatible: bool, batch_size: int) -> Any:
    """Held-out R@10: v2 queries against v1's vectors (new/old) and v2's (new/new) of the
    validation documents plus up to HELDOUT_DISTRACTORS training documents (a fixed
    sample: every epoch encodes them, and a large pair set must not make that cost more
    than the epoch); the score is their mean for a compatible model, new/new alone for
    an independent one."""
    from sentence_transformers.evaluation import SentenceEvaluator

    n = len(distractors.documents)
    pick = np.sort(np.random.default_rng(0).permutation(n)[:HELDOUT_DISTRACTORS])
    docs = val.documents + [distractors.documents[i] for i in pick]
    old = np.concatenate([val.old_docs, distractors.old_docs[pick]])

    class HeldOut(SentenceEvaluator):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.primary_metric = "score"

        def __call__(
            self, model: Any, output_path: str | None = None, epoch: float = -1, steps: int = -1
        ) -> dict[str, float]:
            q = model.encode(val.queries, batch_size=batch_size, convert_to_numpy=True)
            g = model.encode(docs, batch_size=batch_size, convert_to_numpy=True)
            new_new = recall_at_10(q, g, val.doc_of)
            new_old = recall_at_10(q, zero_pad(old, q.shape[1]), val.doc_of) if compatible else 0.0
            score = (new_new + new_old) / 2 if compatible else new_new
            return self.prefix_name_to_metrics(
                {"score": score, "new_new_r10": new_new, "new_old_r10": new_old}, "heldout"
            )

    return HeldOut()


def train_compatible(
    base: Any, pairs: TextPairs, config: TextTrainConfig, callbacks: Sequence[Any] = ()
) -> TextTrainResult:
    """Fine-tune a copy of `base` (a SentenceTransformer) on `pairs` with `config.method`;
    returns the best held-out epoch's model. `base` itself is left untouched. `callbacks`
    are the trainer's (progress reporting)."""
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from transformers import EarlyStoppingCallback, TrainerCallback

    config.check()
    weights = config.resolved_weights()
    compatible = config.method != "independent"
    orthogonal = config.orthogonal or config.method == "oca"
    if len(pairs.queries) < 2 * config.batch_size:
        raise InvalidInput(
            f"{len(pairs.queries)} training pairs are too few for batches of {config.batch_size}",
            hint="give more pairs or a smaller batch_size",
            field="pairs",
        )
    torch.manual_seed(config.seed)
    train_pairs, val = pairs.split(config.val_fraction, config.seed)
    # held out by document: when a few documents carry most queries, the split can leave
    # no held-out query (early stopping would keep epoch 1 blindly) or less than one
    # batch to train on (no step at all: the untrained head would be registered)
    if not val.queries or len(train_pairs.queries) < config.batch_size:
        raise InvalidInput(
            f"holding out {config.val_fraction:.0%} of the {len(pairs.documents)} distinct "
            f"documents leaves {len(train_pairs.queries)} training and {len(val.queries)} "
            f"held-out pairs: too few for batches of {config.batch_size}",
            hint="give pairs over more distinct documents, or a smaller batch_size",
            field="pairs",
        )
    model = (
        compatible_model(base, train_pairs, config.extra_dims, orthogonal, config.seed)
        if compatible
        else _copy(base)
    )
    model.max_seq_length = config.max_seq_length
    d_old = pairs.old_docs.shape[1]

    def dataset(p: TextPairs) -> Any:
        return Dataset.from_dict(
            {
                "query": p.queries,
                "document": [p.documents[j] for j in p.doc_of],
                "label": p.doc_of.tolist(),
            }
        )

    loss = CompatibleLoss(model, train_pairs.old_docs, weights)
    heads = [p for n, p in model.named_parameters() if not n.startswith("0.")]
    body = [p for n, p in model.named_parameters() if n.startswith("0.")]
    optimizer = torch.optim.AdamW(
        [{"params": body, "lr": config.lr}, {"params": heads, "lr": config.head_lr}]
    )

    class KeepOrthogonal(TrainerCallback):  # type: ignore[misc]
        """OCA: after every step, the square layer goes back to the nearest orthogonal
        matrix (polar factor), so it only rotates."""

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            with torch.no_grad():
                w = model[-1].linear.weight
                u, _, vt = torch.linalg.svd(w)
                w.copy_(u @ vt)

    out_dir = config.checkpoint_dir or Path(tempfile.mkdtemp(prefix="embcompat-train-"))
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out_dir),
        num_train_epochs=config.epochs,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        learning_rate=config.lr,
        warmup_steps=0,
        lr_scheduler_type="linear",
        seed=config.seed,
        data_seed=config.seed,
        eval_strategy="epoch",
        save_strategy="epoch",
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model="eval_heldout_score",
        greater_is_better=True,
        logging_strategy="epoch",
        report_to="none",
        disable_tqdm=not config.progress,
        use_cpu=not torch.cuda.is_available(),
        dataloader_drop_last=True,
    )
    hooks: list[Any] = [EarlyStoppingCallback(early_stopping_patience=config.patience), *callbacks]
    if orthogonal:
        hooks.append(KeepOrthogonal())
    trainer = SentenceTransformerTrainer(
        model=model,
        args=args,
        train_dataset=dataset(train_pairs),
        loss=loss,
        evaluator=_evaluator(val, train_pairs, compatible, config.batch_size),
        optimizers=(optimizer, None),  # type: ignore[arg-type]  # None: the trainer builds the schedule
        callbacks=hooks,
    )
    resume = _resume_point(out_dir, _signature(pairs, config))
    started = time.perf_counter()
    logging.getLogger("sentence_transformers").setLevel(logging.WARNING)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    train_s = time.perf_counter() - started
    history = [
        {k: float(v) for k, v in entry.items() if isinstance(v, int | float)}
        for entry in trainer.state.log_history
        if "eval_heldout_score" in entry
    ]
    best = max((h["eval_heldout_score"] for h in history), default=float("nan"))
    if config.checkpoint_dir is None:
        shutil.rmtree(out_dir, ignore_errors=True)
    return TextTrainResult(
        model=model,
        method=config.method,
        d_old=d_old if compatible else 0,
        extra_dims=config.extra_dims if compatible else 0,
        weights=weights,
        history=history,
        best_score=best,
        train_s=train_s,
        resumed_from=resume.name if resume else None,
    )


def _signature(pairs: TextPairs, config: TextTrainConfig) -> str:
    """sha256 of what a checkpoint's weights depend on: the settings (not where they
    are written, nor whether a bar is shown), the pairs' texts and the shape of v1's
    vectors. Not their values: a resumed run encodes them again, maybe on another
    host, where they can differ in the last bits and must not throw the run away."""
    digest = hashlib.sha256()
    settings = dataclasses.asdict(config)
    for ignored in ("checkpoint_dir", "progress"):
        settings.pop(ignored)
    digest.update(json.dumps(settings, sort_keys=True).encode())
    digest.update(json.dumps([pairs.queries, pairs.documents, pairs.old_docs.shape]).encode())
    digest.update(np.ascontiguousarray(pairs.doc_of, np.int64).tobytes())
    return digest.hexdigest()


def _resume_point(out_dir: Path, signature: str) -> Path | None:
    """The checkpoint to resume from, if `out_dir`'s checkpoints were written for these
    inputs. Checkpoints stamped with other inputs (a gallery's probe or items edited
    between a crash and the resume, or a run id reused after the database was restored)
    are removed and the run starts over: resuming them would register weights trained
    on other pairs as if trained on these."""
    stamp = out_dir / SIGNATURE
    try:
        found = json.loads(stamp.read_text()).get("inputs")
    except (OSError, ValueError, AttributeError):
        found = None
    if found != signature:
        for stale in out_dir.glob("checkpoint-*"):
            shutil.rmtree(stale, ignore_errors=True)
        atomic_write(stamp, json.dumps({"inputs": signature}).encode())
    return _last_checkpoint(out_dir)


def _last_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete checkpoint: the trainer writes its state file after the
    weights and optimiser, so a folder without a readable one was cut off mid-write
    (a killed worker) and the one before it is resumed instead."""
    found = [p for p in out_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    for path in sorted(found, key=lambda p: int(p.name.split("-")[-1]), reverse=True):
        try:
            json.loads((path / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue
        return path
    return None


def save_model(model: Any, path: Path) -> None:
    """The library's own format (safetensors, no code), written to a temp folder and
    renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    model.save(str(tmp))
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
