"""Binarizers: vectors to compact binary codes whose Hamming distance ranks like the floats.

Both kinds are adapters (direction `binary: vectors->codes`): `transform(x)` gives ±1
float32 codes (n, bits) and `codes(x)` the same bits packed into uint8 (n, bits / 8),
the rows a faiss binary index holds. Hamming distance = (bits − ⟨c_q, c_x⟩) / 2, so a
Hamming ranking is a ranking by the codes' inner product.

- `itq` (Gong & Lazebnik's Iterative Quantization): centre, project on the top principal
  directions, then learn the orthogonal rotation R that minimises the quantisation loss
  ‖sign(VR) − VR‖ by alternating sign and Procrustes steps. bits ≤ dim uses the top
  `bits` principal directions; bits > dim lifts the whitened-free PCA space with a fixed
  random tight frame (orthonormal rows) before rotating, so ITQ can spend as many bits
  as the recurrent kind.
- `recurrent` (BEBR's recurrent binarization, Tencent KDD'23): stage k encodes the
  residual r_k with a light residual MLP, b_k = sign(·), a linear decoder reconstructs
  x̂_k from b_k, and r_{k+1} = r_k − x̂_k; k stages give k bits per dimension. Stages
  start from ITQ on each residual with least-squares decoders; training is
  embedding-to-embedding with a straight-through estimator (reconstruction of x from
  Σ x̂_k, optionally a listwise term on the in-batch code inner products) and keeps the
  epoch with the best held-out recall of asymmetric code scores. The codes are read
  asymmetrically (`asymmetric_scores`: ⟨q, decoded item⟩): plain Hamming weighs the
  small residual bits as much as the first stage's and loses what they add.

Codes of two versions are comparable when one binarizer codes both: see
`fit_shared`, which trains on new vectors plus old vectors brought into the new space by
a gallery-side adapter.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import numpy as np
import numpy.typing as npt

from embcompat.adapters.base import Adapter
from embcompat.arrays import FloatArray, check_vectors
from embcompat.errors import InsufficientPairs, InvalidInput

MIN_VECTORS = 64
CodeArray = npt.NDArray[np.uint8]


def _n_bits(dim: int, bits_per_dim: float) -> int:
    bits = int(round(dim * bits_per_dim))
    if bits_per_dim <= 0 or bits < 8 or bits % 8:
        raise InvalidInput(
            f"a binarizer of dim {dim} at {bits_per_dim} bits/dim gives {bits} bits, "
            "not a positive multiple of 8",
            hint="faiss binary indexes store whole bytes: pick bits_per_dim so dim x it is",
            field="bits_per_dim",
        )
    return bits


def _train_vectors(vectors: Any, what: str) -> FloatArray:
    arr = np.asarray(vectors, dtype=np.float32)
    if arr.ndim != 2:
        raise InvalidInput(f"{what} expects a 2-d array of vectors, got shape {arr.shape}")
    x = check_vectors(arr, arr.shape[1], what)
    if len(x) < MIN_VECTORS:
        raise InsufficientPairs(f"{what} needs at least {MIN_VECTORS} vectors, got {len(x)}")
    return x


def _sign(x: npt.NDArray[Any]) -> FloatArray:
    """sign with sign(0) = +1, so every bit is defined."""
    return np.where(x >= 0, 1.0, -1.0).astype(np.float32)


def itq_rotation(v: npt.NDArray[np.float64], iterations: int, seed: int) -> npt.NDArray[Any]:
    """v: (n, b) centred projections → orthogonal R (b, b) minimising ‖sign(vR) − vR‖."""
    rng = np.random.default_rng(seed)
    r, _ = np.linalg.qr(rng.standard_normal((v.shape[1], v.shape[1])))
    for _ in range(iterations):
        b = np.where(v @ r >= 0, 1.0, -1.0)
        u, _, vt = np.linalg.svd(v.T @ b)
        r = u @ vt
    return r


class Binarizer(Adapter):
    """An adapter whose output is ±1 codes; adds packed codes and bits/dim."""

    def __init__(self, source_dim: int, bits: int) -> None:
        super().__init__(source_dim, bits, "binary: vectors->codes")

    @property
    def bits(self) -> int:
        return self.target_dim

    @property
    def bits_per_dim(self) -> float:
        return self.bits / self.source_dim

    def codes(self, x: Any) -> CodeArray:
        """x: (n, source_dim) → packed codes (n, bits / 8) uint8, for faiss binary indexes."""
        return np.packbits(self.transform(x) > 0, axis=1)

    def query_projection(self, q: Any) -> FloatArray:
        """q: (nq, source_dim) float queries → (nq, bits) such that ⟨projection, code⟩ with
        a ±1 code ranks items as ⟨q, decoded item⟩ does: asymmetric scoring, the query
        kept in floats and only the items binary."""
        return self._project(check_vectors(q, self.source_dim, f"binarizer {self.name}"))

    def asymmetric_scores(self, q: Any, codes: CodeArray, chunk: int = 16) -> FloatArray:
        """q: (nq, source_dim), codes: (nq, c, bits / 8) packed → (nq, c) scores; codes are
        unpacked `chunk` queries at a time to bound the temporary (chunk, c, bits)."""
        proj = self.query_projection(q)
        out = np.empty(codes.shape[:2], np.float32)
        for s in range(0, len(proj), chunk):
            signs = np.unpackbits(codes[s : s + chunk], axis=-1).astype(np.float32) * 2 - 1
            out[s : s + chunk] = np.matmul(signs, proj[s : s + chunk, :, None])[..., 0]
        return out

    @abstractmethod
    def _project(self, q: FloatArray) -> FloatArray: ...


class ITQBinarizer(Binarizer):
    kind = "itq"

    @classmethod
    def fit(
        cls, vectors: Any, bits_per_dim: float = 1.0, iterations: int = 50, seed: int = 0
    ) -> ITQBinarizer:
        """vectors: (n, d) a sample of the space → ITQ with round(d · bits_per_dim) bits."""
        x = _train_vectors(vectors, "itq").astype(np.float64)
        d = x.shape[1]
        bits = _n_bits(d, bits_per_dim)
        mu = x.mean(0)
        _, _, vt = np.linalg.svd(x - mu, full_matrices=False)
        pca = vt.T  # (d, min(n, d)), columns by decreasing variance
        if bits <= pca.shape[1]:
            proj = pca[:, :bits]
        else:  # lift: a random tight frame F (rank, bits) with F Fᵀ = I keeps geometry
            q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((bits, pca.shape[1])))
            proj = pca @ q.T
        v = (x - mu) @ proj
        rotation = itq_rotation(v, iterations if bits <= 1024 else max(10, iterations // 3), seed)
        obj = cls(d, bits)
        obj._load({}, {"mu": mu, "projection": proj @ rotation})
        return obj

    def _apply(self, x: FloatArray) -> FloatArray:
        return _sign((x - self._mu) @ self._projection)

    def _project(self, q: FloatArray) -> FloatArray:
        return ((q - self._mu) @ self._projection).astype(np.float32)

    def arrays(self) -> dict[str, npt.NDArray[Any]]:
        return {"mu": self._mu, "projection": self._projection}

    def _load(self, config: dict[str, Any], arrays: dict[str, npt.NDArray[Any]]) -> None:
        self._mu = np.ascontiguousarray(arrays["mu"], dtype=np.float32)
        self._projection = np.ascontiguousarray(arrays["projection"], dtype=np.float32)


def _gelu(x: npt.NDArray[Any]) -> FloatArray:
    from scipy.special import erf

    return (0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))).astype(np.float32)


class RecurrentBinarizer(Binarizer):
    kind = "recurrent"
    STAGE_ARRAYS = ("mu", "enc", "w1", "b1", "w2", "dec", "dec_b")

    @classmethod
    def fit(
        cls,
        vectors: Any,
        bits_per_dim: int = 2,
        hidden: int = 256,
        epochs: int = 10,
        batch_size: int = 512,
        lr: float = 2e-5,
        temperature: float = 0.05,
        rank_weight: float = 0.0,
        patience: int = 3,
        seed: int = 0,
    ) -> RecurrentBinarizer:
        """vectors: (n, d) a sample of the space → `bits_per_dim` stages of d bits each."""
        import torch
        from torch import nn

        x = _train_vectors(vectors, "recurrent")
        d = x.shape[1]
        if int(bits_per_dim) != bits_per_dim or bits_per_dim < 1:
            raise InvalidInput(
                f"recurrent binarizer needs a whole number of stages, got {bits_per_dim} bits/dim",
                field="bits_per_dim",
            )
        _n_bits(d, bits_per_dim)
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(x))
        n_val = max(MIN_VECTORS // 2, min(len(x) // 10, 2000))  # held out: early stopping
        val, x = x[order[:n_val]], x[order[n_val:]]
        stages = _itq_residual_init(x, int(bits_per_dim), seed, hidden)
        torch.manual_seed(seed)
        params = {
            f"{k}.{name}": nn.Parameter(torch.from_numpy(arr.copy()))
            for k, stage in enumerate(stages)
            for name, arr in stage.items()
        }
        opt = torch.optim.Adam(params.values(), lr=lr)
        logit_scale = nn.Parameter(torch.tensor(float(np.log(1.0 / temperature))))
        opt.add_param_group({"params": [logit_scale]})
        xt = torch.from_numpy(x)
        config = {"stages": len(stages), "hidden": hidden}
        truth = np.argsort(-(val @ val.T) + np.eye(len(val)) * 1e9, axis=1)[:, :10]

        def snapshot() -> tuple[float, RecurrentBinarizer]:
            """The current weights as a binarizer, and its held-out asymmetric recall."""
            obj = cls(d, d * len(stages))
            obj._load(config, {n: p.detach().numpy().copy() for n, p in params.items()})
            scores = obj.query_projection(val) @ obj.transform(val).T
            np.fill_diagonal(scores, -np.inf)
            top = np.argsort(-scores, axis=1)[:, :10]
            hits = [len(set(a) & set(b)) for a, b in zip(top.tolist(), truth.tolist(), strict=True)]
            return float(np.mean(hits)) / 10, obj

        def forward(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            residual, recon, codes = batch, torch.zeros_like(batch), []
            for k in range(len(stages)):
                p = {n: params[f"{k}.{n}"] for n in cls.STAGE_ARRAYS}
                z = residual - p["mu"]
                h = z @ p["enc"] + nn.functional.gelu(z @ p["w1"] + p["b1"]) @ p["w2"]
                soft = torch.tanh(h)
                b = soft + (torch.sign(h) + (h == 0).float() - soft).detach()  # STE
                part = b @ p["dec"] + p["dec_b"]
                recon, residual = recon + part, residual - part
                codes.append(b)
            return recon, torch.cat(codes, dim=1)

        best_score, best = snapshot()  # epoch 0: the residual-ITQ start
        bad = 0
        for _ in range(epochs):
            perm = torch.from_numpy(rng.permutation(len(x)))
            for start in range(0, len(x) - MIN_VECTORS // 2, batch_size):
                idx = perm[start : start + batch_size]
                batch = xt[idx]
                recon, code = forward(batch)
                loss = ((recon - batch) ** 2).sum(1).mean()
                if rank_weight:
                    sim_f = batch @ batch.T / temperature
                    sim_c = code @ code.T / code.shape[1] * logit_scale.exp()
                    eye = torch.eye(len(idx), dtype=torch.bool)
                    sim_f, sim_c = sim_f.masked_fill(eye, -1e9), sim_c.masked_fill(eye, -1e9)
                    loss = loss + rank_weight * nn.functional.kl_div(
                        nn.functional.log_softmax(sim_c, 1),
                        nn.functional.log_softmax(sim_f, 1),
                        log_target=True,
                        reduction="batchmean",
                    )
                opt.zero_grad()
                loss.backward()
                opt.step()
            score, obj = snapshot()
            if score > best_score:
                best_score, best, bad = score, obj, 0
            else:
                bad += 1
                if bad >= patience:
                    break
        return best

    def _stage_outputs(self, x: FloatArray) -> tuple[list[FloatArray], FloatArray]:
        residual, codes = x, []
        recon = np.zeros_like(x)
        for k in range(self.stages):
            a = {n: self._arrays[f"{k}.{n}"] for n in self.STAGE_ARRAYS}
            z = residual - a["mu"]
            b = _sign(z @ a["enc"] + _gelu(z @ a["w1"] + a["b1"]) @ a["w2"])
            part = b @ a["dec"] + a["dec_b"]
            recon, residual = recon + part, residual - part
            codes.append(b)
        return codes, recon

    def _apply(self, x: FloatArray) -> FloatArray:
        return np.concatenate(self._stage_outputs(x)[0], axis=1)

    def _project(self, q: FloatArray) -> FloatArray:
        """⟨q, Σ_k b_k D_k + c⟩ = Σ_k ⟨q D_kᵀ, b_k⟩ + const: BEBR's decoded-space score."""
        decoders = [self._arrays[f"{k}.dec"] for k in range(self.stages)]
        return np.concatenate([q @ d.T for d in decoders], axis=1).astype(np.float32)

    def reconstruct(self, x: Any) -> FloatArray:
        """x: (n, d) → the decoder's reconstruction Σ x̂_k (n, d), to measure what bits keep."""
        return self._stage_outputs(check_vectors(x, self.source_dim, "recurrent"))[1]

    def arrays(self) -> dict[str, npt.NDArray[Any]]:
        return dict(self._arrays)

    def config(self) -> dict[str, Any]:
        return {"stages": self.stages, "hidden": self.hidden}

    def _load(self, config: dict[str, Any], arrays: dict[str, npt.NDArray[Any]]) -> None:
        self.stages, self.hidden = int(config["stages"]), int(config["hidden"])
        self._arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()}


def _itq_residual_init(x: FloatArray, stages: int, seed: int, hidden: int) -> list[dict[str, Any]]:
    """Per stage: ITQ on the current residual as encoder, least-squares decoder, and an
    MLP branch whose output layer starts at zero (training starts at residual ITQ)."""
    rng = np.random.default_rng(seed)
    d = x.shape[1]
    residual, out = x.astype(np.float64), []
    for k in range(stages):
        itq = ITQBinarizer.fit(residual, 1.0, iterations=30, seed=seed + k)
        b = itq.transform(residual.astype(np.float32)).astype(np.float64)
        design = np.hstack([b, np.ones((len(b), 1))])
        sol, *_ = np.linalg.lstsq(design, residual, rcond=None)
        dec, dec_b = sol[:-1], sol[-1]
        out.append(
            {
                "mu": itq._mu,
                "enc": itq._projection,
                "w1": (rng.standard_normal((d, hidden)) / np.sqrt(d)).astype(np.float32),
                "b1": np.zeros(hidden, np.float32),
                "w2": np.zeros((hidden, d), np.float32),
                "dec": dec.astype(np.float32),
                "dec_b": dec_b.astype(np.float32),
            }
        )
        residual = residual - (b @ dec + dec_b)
    return out


BINARIZERS: dict[str, type[Binarizer]] = {"itq": ITQBinarizer, "recurrent": RecurrentBinarizer}


def fit_binarizer(kind: str, vectors: Any, bits_per_dim: float, **kwargs: Any) -> Binarizer:
    """Fit a binarizer by kind name (`itq` or `recurrent`)."""
    if kind == "itq":
        return ITQBinarizer.fit(vectors, bits_per_dim, **kwargs)
    if kind == "recurrent":
        return RecurrentBinarizer.fit(vectors, int(bits_per_dim), **kwargs)
    raise InvalidInput(f"unknown binarizer {kind!r}", hint=f"one of {', '.join(BINARIZERS)}")


def fit_shared(
    kind: str, new: Any, old: Any, mapper: Adapter, bits_per_dim: float, **kwargs: Any
) -> Binarizer:
    """One binarizer for both versions of an upgrade: trained on new vectors plus old
    vectors mapped into the new space by `mapper` (a gallery-side adapter old→new), so old
    items coded as `codes(mapper.transform(v_old))` share one binary index with new ones."""
    if mapper.direction != "gallery: old->new":
        raise InvalidInput(
            f"a shared binarizer needs a gallery-side adapter old->new, got {mapper.name}"
        )
    new_x = np.asarray(new, np.float32)
    sample = np.vstack([new_x, mapper.transform(old)])
    return fit_binarizer(kind, sample, bits_per_dim, **kwargs)
