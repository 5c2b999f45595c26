"""A v2 trained compatible with v1 (BT²) serves v1's gallery with no adapter and nothing
re-embedded: registered in MLflow with lineage, encoded through the registry, searched
through the `basis` plan."""

from __future__ import annotations

import numpy as np
import pytest

from embcompat.registry import versions
from embcompat.service import upgrade
from embcompat.service.context import Context
from embcompat.service.galleries import ItemIn, create_gallery, ingest, space_store
from embcompat.service.search import search
from embcompat.service.trained import register_trained
from embcompat.training.fashion import load_fashion_mnist
from embcompat.training.methods import train_model
from embcompat.training.trainer import TrainConfig


@pytest.fixture(scope="module")
def trained() -> dict[str, object]:
    x, y = load_fashion_mnist("train")
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(x))[:20000]
    x, y = x[idx], y[idx]
    cfg = TrainConfig(epochs=4, progress=False)
    old = y < 5
    v1 = train_model("independent", x[old], y[old], (16, 32, 64), 32, cfg)
    v2 = train_model("bt2", x, y, (16, 32, 64), 0, cfg, old=v1, extra_dims=32)
    return {"v1": v1, "v2": v2}


def top1(response_hits: list, labels: np.ndarray) -> float:
    got = [int(hits[0].item.split("-")[1]) for hits in response_hits]
    return float(np.mean(np.array(got) == labels))


def test_bt2_version_serves_the_v1_gallery_without_reembedding(
    ctx: Context, trained: dict[str, object]
) -> None:
    v1, v2 = trained["v1"], trained["v2"]
    r1 = register_trained(ctx, v1, "fashion", "v1")  # type: ignore[arg-type]
    r2 = register_trained(ctx, v2, "fashion", "v2", compatible_with=r1)  # type: ignore[arg-type]
    assert r2.tags == {
        "method": "bt2", "extra_dims": "32", "input": "image:28x28", "compatible_with": "fashion:v1"
    }  # fmt: skip
    assert r2.parent == "v1" and r2.dim == 64
    with ctx.session() as s:
        assert versions.lineage(s, "fashion", "v2") == ["v1", "v2"]
    mv = ctx.registry.get_version("fashion", r2.mlflow_version)  # type: ignore[arg-type]
    assert mv.tags["compatible_with"] == "fashion:v1" and mv.tags["method"] == "bt2"

    xt, yt = load_fashion_mnist("test")
    gallery_x, gallery_y, qx, qy = xt[:1500], yt[:1500], xt[1500:1800], yt[1500:1800]
    create_gallery(ctx, "shop", "fashion", "v1")
    g_vectors = v1.embed(gallery_x)  # type: ignore[attr-defined]
    pairs = enumerate(zip(gallery_y, g_vectors, strict=True))
    ingest(ctx, "shop", [ItemIn(f"{i}-{c}", vector=v.tolist()) for i, (c, v) in pairs])
    enc1 = ctx.encoder(r1)
    old_old = top1(search(ctx, "shop", vectors=enc1.encode(list(qx))).hits, qy)

    job = upgrade.start_upgrade(ctx, "shop", "fashion", "v2", plan="basis")
    upgrade.step_pair(ctx, job.id)
    upgrade.step_train(ctx, job.id)
    upgrade.step_gate(ctx, job.id)
    state = upgrade.get_job(ctx, job.id)
    assert (state.state, state.plan) == ("serving_bridge", "basis")
    assert "trained compatible with fashion:v1" in state.report["gate"]["reason"]

    enc2 = ctx.encoder(r2)  # the registered pyfunc, fed images
    q2 = enc2.encode(list(qx))
    assert q2.shape == (300, 64) and np.allclose(np.linalg.norm(q2, axis=1), 1, atol=1e-5)
    res = search(ctx, "shop", vectors=q2, k=5)
    assert res.plan == "basis" and {h.path for hits in res.hits for h in hits} == {"basis"}
    new_old = top1(res.hits, qy)
    assert new_old > old_old, (new_old, old_old)  # the compatibility criterion, no re-embedding
    assert len(space_store(ctx, "shop", r2)) == 0  # nothing re-embedded
    # a wrong-width query is refused with the version's dim named
    with pytest.raises(Exception, match="dim 64"):
        search(ctx, "shop", vectors=np.zeros((1, 32), np.float32))
