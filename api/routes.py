"""One router per resource; every route is a thin call into the service layer."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, BackgroundTasks, Path, Query, Request, status
from fastapi.responses import JSONResponse

from embcompat.adapters.select import CANDIDATES
from embcompat.api.deps import Admin, Ctx, Read, audit, scrubbed
from embcompat.api.schemas import (
    NAME_PATTERN,
    AdapterFitIn,
    GalleryIn,
    ItemIdsIn,
    ItemsIn,
    ProbeIn,
    SearchIn,
    TrainingIn,
    UpgradeIn,
    VersionIn,
)
from embcompat.errors import InvalidInput, SearchTooLarge
from embcompat.kinds import IndexKind
from embcompat.registry import adapter_records, versions
from embcompat.registry.audit import list_events
from embcompat.service import galleries, reports, search, training, upgrade
from embcompat.service.adapters import fit_standalone
from embcompat.service.upgrade.schedule import BackfillSchedule
from embcompat.workers.app import (
    dispatch_ingest,
    dispatch_report,
    dispatch_training,
    dispatch_upgrade,
)

Id = Annotated[int, Path(ge=1, le=2**31 - 1)]
# names in paths obey the rules names in bodies do: a NUL byte or a '..' never reaches
# the database or a path on disk
NamePath = Annotated[str, Path(min_length=1, max_length=200, pattern=NAME_PATTERN)]
models = APIRouter(prefix="/models", tags=["models"])
gals = APIRouter(prefix="/galleries", tags=["galleries"])
adapters = APIRouter(prefix="/adapters", tags=["adapters"])
jobs = APIRouter(prefix="/upgrades", tags=["upgrades"])
audit_trail = APIRouter(prefix="/audit", tags=["audit"])
trainings = APIRouter(prefix="/training", tags=["training"])


@models.post("/{model}/versions", status_code=status.HTTP_201_CREATED, dependencies=[Admin])
def register_version(
    model: NamePath, body: VersionIn, ctx: Ctx, tasks: BackgroundTasks
) -> dict[str, Any]:
    """Register a version; if another version of the model serves a gallery, its upgrade
    report is measured on the workers (GET .../report)."""
    with ctx.session() as s:
        rec = versions.register_version(
            s,
            ctx.registry,
            model=model,
            version=body.version,
            dim=body.dim,
            source=body.source,
            location=body.location,
            metric=body.metric,  # type: ignore[arg-type]
            parent=body.parent,
            models_dir=ctx.models_dir,
            policy=ctx.model_policy,
        )
    report = reports.request_report(ctx, model, body.version)
    if report:
        tasks.add_task(dispatch_report, ctx, model, body.version)
    return {**rec.to_dict(), "report": "pending" if report else None}


@models.get("/{model}/versions/{version}/report", dependencies=[Read])
def version_report(model: NamePath, version: NamePath, ctx: Ctx) -> dict[str, Any]:
    """What upgrading each gallery of the model to this version would do (state pending
    until the workers have measured it)."""
    return scrubbed(reports.get_report(ctx, model, version), ctx.settings)


@models.get("/versions", dependencies=[Read])
def list_versions(
    ctx: Ctx, model: Annotated[str | None, Query(pattern=NAME_PATTERN, max_length=200)] = None
) -> list[dict[str, Any]]:
    with ctx.session() as s:
        return [r.to_dict() for r in versions.list_versions(s, ctx.registry, model)]


@models.get("/{model}/versions/{version}", dependencies=[Read])
def show_version(model: NamePath, version: NamePath, ctx: Ctx) -> dict[str, Any]:
    with ctx.session() as s:
        rec = versions.get_version(s, ctx.registry, model, version)
        return {**rec.to_dict(), "lineage": versions.lineage(s, model, version)}


@models.post("/{model}/versions/{version}/aliases/{alias}", dependencies=[Admin])
def promote(
    model: NamePath, version: NamePath, alias: NamePath, ctx: Ctx, tasks: BackgroundTasks
) -> dict[str, Any]:
    if alias not in ("serving", "candidate"):
        raise InvalidInput(f"unknown alias {alias!r}", hint="serving or candidate", field="alias")
    with ctx.session() as s:
        rec = versions.promote(s, ctx.registry, model, version, alias).to_dict()
    if alias == "candidate" and reports.request_report(ctx, model, version):
        tasks.add_task(dispatch_report, ctx, model, version)  # a candidate gets its report
    return rec


@gals.post("", status_code=status.HTTP_201_CREATED, dependencies=[Admin])
def create_gallery(body: GalleryIn, ctx: Ctx) -> dict[str, Any]:
    return galleries.create_gallery(
        ctx, body.name, body.model, body.version, body.index_kind
    ).to_dict()


@gals.get("", dependencies=[Read])
def list_galleries(ctx: Ctx) -> list[dict[str, Any]]:
    return [g.to_dict() for g in galleries.list_galleries(ctx)]


@gals.get("/{name}", dependencies=[Read])
def gallery_stats(name: NamePath, ctx: Ctx) -> dict[str, Any]:
    return {**galleries.get_gallery(ctx, name).to_dict(), **galleries.stats(ctx, name)}


@gals.post("/{name}/items", dependencies=[Admin])
def ingest(name: NamePath, body: ItemsIn, ctx: Ctx, request: Request) -> dict[str, int]:
    items = [galleries.ItemIn(i.id, i.text, i.vector, i.metadata) for i in body.items]
    out = galleries.ingest(ctx, name, items)
    audit(request, **out)
    return out


@gals.post("/{name}/items/stage", status_code=status.HTTP_202_ACCEPTED, dependencies=[Admin])
def stage_items(
    name: NamePath, body: ItemsIn, ctx: Ctx, tasks: BackgroundTasks, request: Request
) -> dict[str, int]:
    """Store texts now; the `ingest` task encodes them on the workers, in batches."""
    staged = galleries.stage(
        ctx, name, [galleries.ItemIn(i.id, i.text, i.vector, i.metadata) for i in body.items]
    )
    audit(request, staged=staged)
    tasks.add_task(dispatch_ingest, ctx, name)
    return {"staged": staged}


@gals.post("/{name}/items/delete", dependencies=[Admin])
def delete_items(name: NamePath, body: ItemIdsIn, ctx: Ctx, request: Request) -> dict[str, int]:
    deleted = galleries.delete_items(ctx, name, body.ids)
    audit(request, deleted=deleted)
    return {"deleted": deleted}


@gals.post("/{name}/publish", dependencies=[Admin])
def publish(name: NamePath, ctx: Ctx, index_kind: IndexKind | None = None) -> dict[str, int]:
    return galleries.publish(ctx, name, index_kind)


@gals.put("/{name}/probe", dependencies=[Admin])
def set_probe(name: NamePath, body: ProbeIn, ctx: Ctx) -> dict[str, Any]:
    """Store the gallery's labelled probe (replacing any): upgrades that give none and
    registration reports measure with it."""
    return galleries.set_probe(ctx, name, [q.model_dump() for q in body.queries])


@gals.get("/{name}/probe", dependencies=[Admin])
def probe_summary(name: NamePath, ctx: Ctx) -> dict[str, Any]:
    """Counts of the stored probe (labels are not served back)."""
    return galleries.probe_summary(ctx, name)


@gals.post("/{name}/verify", dependencies=[Admin])
def verify_gallery(name: NamePath, ctx: Ctx) -> dict[str, Any]:
    """Read every file of the gallery against its checksum: {space: problem}."""
    return {"gallery": name, "problems": galleries.verify(ctx, name)}


@gals.post("/{name}/repair", dependencies=[Admin])
def repair_gallery(name: NamePath, ctx: Ctx) -> dict[str, Any]:
    """Rebuild every space from its sound vectors and the stored payloads, re-publish."""
    return {"gallery": name, "spaces": galleries.repair(ctx, name)}


@gals.post("/{name}/search", dependencies=[Read])
def search_gallery(name: NamePath, body: SearchIn, ctx: Ctx, request: Request) -> JSONResponse:
    """Bounded: at most `max_search_queries` queries, queries x k hits and
    `max_response_bytes` of answer (EMBCOMPAT_* settings)."""
    limits = ctx.settings
    queries = max(len(body.texts or []), len(body.vectors or []), len(body.old_vectors or []))
    if queries > limits.max_search_queries:
        raise SearchTooLarge(
            f"{queries} queries in one search, the limit is {limits.max_search_queries}",
            hint="split the queries over several requests",
        )
    if queries * body.k > limits.max_search_hits:
        raise SearchTooLarge(
            f"{queries} queries x k={body.k} asks for {queries * body.k} hits, the limit "
            f"is {limits.max_search_hits}",
            hint="ask for a smaller k or fewer queries per request",
        )
    res = search.search(
        ctx, name, body.texts, body.vectors, body.k, body.old_vectors, filters=body.filter_dict()
    )
    request.app.state.metrics.observe_search(res.plan, res.encodes, res.latency_ms / 1e3)
    response = JSONResponse(scrubbed(res.to_dict(), limits))
    if len(response.body) > limits.max_response_bytes:
        raise SearchTooLarge(
            f"the answer would be {len(response.body)} bytes, the limit is "
            f"{limits.max_response_bytes}",
            hint="ask for a smaller k or fewer queries per request",
        )
    return response


@gals.post("/{name}/upgrades/plan", dependencies=[Admin])
def plan_upgrade(name: NamePath, body: UpgradeIn, ctx: Ctx) -> dict[str, Any]:
    return upgrade.plan_upgrade(ctx, name, body.model, body.version, body.plan)


@gals.post("/{name}/upgrades", status_code=status.HTTP_202_ACCEPTED, dependencies=[Admin])
def start_upgrade(
    name: NamePath, body: UpgradeIn, ctx: Ctx, tasks: BackgroundTasks, request: Request
) -> dict[str, Any]:
    probe = [q.model_dump() for q in body.probe] if body.probe else None
    schedule = BackfillSchedule(**body.schedule.model_dump()) if body.schedule else None
    job = upgrade.start_upgrade(
        ctx, name, body.model, body.version, body.plan, body.pairs, body.chunk_size, schedule,
        probe, body.override,
    )  # fmt: skip
    if body.override:
        audit(request, override="true")
    tasks.add_task(dispatch_upgrade, ctx, job.id)  # in-process runs after the reply
    return job.to_dict()


@jobs.get("/{job_id}", dependencies=[Read])
def job_status(job_id: Id, ctx: Ctx) -> dict[str, Any]:
    return scrubbed(upgrade.get_job(ctx, job_id).to_dict(), ctx.settings)


@jobs.post("/{job_id}/{action}", dependencies=[Admin])
def control(job_id: Id, action: str, ctx: Ctx, tasks: BackgroundTasks) -> dict[str, Any]:
    if action not in upgrade.CONTROLS:
        raise InvalidInput(
            f"unknown action {action!r}", hint=", ".join(upgrade.CONTROLS), field="action"
        )
    rec = upgrade.CONTROLS[action](ctx, job_id)
    if action == "resume":
        tasks.add_task(dispatch_upgrade, ctx, job_id)
    return scrubbed(rec.to_dict(), ctx.settings)


@adapters.post("", status_code=status.HTTP_201_CREATED, dependencies=[Admin])
def fit_adapter(body: AdapterFitIn, ctx: Ctx) -> dict[str, Any]:
    """Fit and evaluate the adapters between two versions of a model without an upgrade
    (the bridge, the mapper and, for a wider new space, the basis), on the pairs given
    or sampled; each is logged to MLflow with its metrics and curve. Runs in the request
    (encoding the pairs takes as long as the encoders need)."""
    kinds = tuple(CANDIDATES) if body.kind == "auto" else (body.kind,)
    vectors = (body.vectors.old, body.vectors.new) if body.vectors else None
    return fit_standalone(
        ctx, body.model, body.old_version, body.new_version, kinds=kinds,
        gallery=body.gallery, texts=body.texts, vectors=vectors, sample=body.sample,
    )  # fmt: skip


@adapters.get("", dependencies=[Read])
def list_adapters(ctx: Ctx) -> list[dict[str, Any]]:
    with ctx.session() as s:
        return adapter_records.list_adapters(s)


@adapters.get("/{adapter_id}", dependencies=[Read])
def show_adapter(adapter_id: Id, ctx: Ctx) -> dict[str, Any]:
    with ctx.session() as s:
        return adapter_records.get_adapter(s, adapter_id)


@audit_trail.get("", dependencies=[Admin])
def list_audit(
    ctx: Ctx,
    after: Annotated[
        int, Query(ge=0, le=2**62, description="the last id of the previous page")
    ] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    actor: Annotated[str | None, Query(max_length=100)] = None,
) -> list[dict[str, Any]]:
    """Admin actions, oldest first: who (the token's name), what, when, how it ended."""
    with ctx.session() as s:
        return list_events(s, after, limit, actor)


@trainings.post("", status_code=status.HTTP_202_ACCEPTED, dependencies=[Admin])
def train_compatible(
    body: TrainingIn, ctx: Ctx, tasks: BackgroundTasks, request: Request
) -> dict[str, Any]:
    """Fine-tune a version compatible with `old` on the workers and register it; poll
    GET /training/{id} for its progress and the version it registered."""
    run_id = training.request_training(
        ctx, old=body.old, version=body.version, base=body.base,
        pairs=[(q, d) for q, d in body.pairs] if body.pairs is not None else None,
        gallery=body.gallery, method=body.method, extra_dims=body.extra_dims,
        weights={str(k): v for k, v in body.weights.items()} if body.weights else None,
        epochs=body.epochs, batch_size=body.batch_size, seed=body.seed,
    )  # fmt: skip
    audit(request, run=run_id)
    tasks.add_task(dispatch_training, ctx, run_id)
    return training.get_training(ctx, run_id)


@trainings.get("/{run_id}", dependencies=[Read])
def training_run(run_id: Id, ctx: Ctx) -> dict[str, Any]:
    return training.get_training(ctx, run_id)
