"""The `embcompat` command line: thin over the same service functions as the API, or,
with `--url` and `--token` (EMBCOMPAT_URL, EMBCOMPAT_TOKEN), over the API itself: the
same output and exit codes either way (`embcompat.client`)."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    track,
)
from rich.table import Table

from embcompat.client import Client, Local, Remote, shown_url
from embcompat.errors import EmbcompatError
from embcompat.kinds import TERMINAL_STATES, IndexKind, Metric, UpgradePlan
from embcompat.service import migrate
from embcompat.service.context import Context

app = typer.Typer(help="Backward-compatible embedding model upgrade.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
models_app = typer.Typer(
    help="Embedding model versions in the MLflow registry.", no_args_is_help=True
)
gallery_app = typer.Typer(help="Galleries: create, ingest, stats.", no_args_is_help=True)
upgrade_app = typer.Typer(help="Upgrade a gallery to a new model version.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(models_app, name="models")
app.add_typer(gallery_app, name="gallery")
app.add_typer(upgrade_app, name="upgrade")
console = Console()
T = TypeVar("T")
# --url/--token of this invocation, set by the root callback before any command runs
_REMOTE: ContextVar[tuple[str | None, str | None]] = ContextVar("remote", default=(None, None))


def _fail(exc: EmbcompatError) -> None:
    console.print(f"[red]error[/red] ({exc.code}): {exc.message}", markup=True, highlight=False)
    if exc.hint:
        console.print(f"hint: {exc.hint}", markup=False, highlight=False)
    raise typer.Exit(code=2)


@app.callback()
def main(
    url: Annotated[
        str | None, typer.Option(envvar="EMBCOMPAT_URL", help="an embcompat API to work through")
    ] = None,
    token: Annotated[
        str | None, typer.Option(envvar="EMBCOMPAT_TOKEN", help="its bearer token")
    ] = None,
) -> None:
    """Backward-compatible embedding model upgrade."""
    _REMOTE.set((url, token))


def _remote() -> tuple[str | None, str | None]:
    return _REMOTE.get()


def _client() -> Client:
    """The API at --url when one is given, else the service in this process."""
    url, token = _remote()
    if url is None:
        return Local()
    if not token:
        console.print("[red]error[/red]: --url needs --token (or EMBCOMPAT_TOKEN)")
        raise typer.Exit(code=2)
    return Remote(url, token)


def _local_only(command: str) -> None:
    if _remote()[0] is not None:
        console.print(f"[red]error[/red]: `embcompat {command}` runs on the server's host")
        raise typer.Exit(code=2)


@db_app.command("upgrade")
def db_upgrade(revision: str = "head") -> None:
    """Apply the Alembic migrations to the configured database (with --url: report the
    server's schema, which `embcompat serve` migrates on start)."""
    url, _ = _remote()
    if url is not None:
        ready = _guard(lambda: _client_ready(url))
        console.print(f"schema: {ready}")
        raise typer.Exit(0 if ready == "ok" else 1)
    settings = Context().settings
    migrate.upgrade(settings.resolved_database_url, revision)
    console.print(f"database at {revision}")


def _client_ready(url: str) -> str:
    import httpx

    try:
        checks = httpx.get(f"{url.rstrip('/')}/ready", timeout=30).json()["checks"]
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        raise EmbcompatError(
            f"no readiness report from {shown_url(url)}: {type(exc).__name__}"
        ) from exc
    return str(checks.get("schema", checks.get("database", "unknown")))


def _guard(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except EmbcompatError as exc:
        _fail(exc)
        raise  # unreachable: _fail exits


def _print_json(payload: Any) -> None:
    json.dump(payload, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


@models_app.command("register")
def models_register(
    model: str,
    version: str,
    dim: Annotated[int, typer.Option(help="declared output dimension")],
    shipped: Annotated[str | None, typer.Option(help="a model shipped in a PyPI package")] = None,
    from_dir: Annotated[str | None, typer.Option(help="a sentence-transformers directory")] = None,
    mlflow_uri: Annotated[str | None, typer.Option(help="an existing MLflow model URI")] = None,
    external: Annotated[bool, typer.Option(help="clients send the vectors")] = False,
    metric: Metric = Metric.COSINE,
    parent: Annotated[str | None, typer.Option(help="the version this one succeeds")] = None,
) -> None:
    """Register MODEL:VERSION from exactly one source (folders and MLflow models must
    lie inside the server's model roots)."""
    sources = {"shipped": shipped, "dir": from_dir, "mlflow": mlflow_uri}
    chosen = [k for k, v in sources.items() if v] + (["external"] if external else [])
    if len(chosen) != 1:
        console.print(
            "[red]error[/red]: give exactly one of --shipped, --from-dir, --mlflow-uri, --external"
        )
        raise typer.Exit(code=2)
    body = {"version": version, "dim": dim, "source": chosen[0], "metric": str(metric),
            "location": sources.get(chosen[0]), "parent": parent}  # fmt: skip
    with console.status("registering (and measuring its upgrade report, if a gallery is served)"):
        rec = _guard(lambda: _client().register_version(model, body))
    console.print(
        f"registered {rec['model']}:{rec['version']} (MLflow {rec['mlflow_name']} "
        f"v{rec['mlflow_version']}, dim {rec['dim']})"
    )
    if rec.get("report"):
        console.print(f"upgrade report {rec['report']}: `embcompat report {model} {version}`")


@models_app.command("list")
def models_list(model: Annotated[str | None, typer.Argument()] = None) -> None:
    """List registered versions with their aliases."""
    table = Table("model", "version", "dim", "metric", "encoder", "parent", "aliases")
    for r in _guard(lambda: _client().list_versions(model)):
        table.add_row(
            r["model"], r["version"], str(r["dim"]), r["metric"], r["encoder_uri"],
            r["parent"] or "", ",".join(r["aliases"]),
        )  # fmt: skip
    console.print(table)


@models_app.command("show")
def models_show(model: str, version: str) -> None:
    """Show one version as JSON, with its lineage."""
    _print_json(_guard(lambda: _client().show_version(model, version)))


@models_app.command("promote")
def models_promote(model: str, version: str, alias: str = "serving") -> None:
    """Point an alias (serving or candidate) at MODEL:VERSION."""
    rec = _guard(lambda: _client().promote(model, version, alias))
    console.print(f"{model}:{version} is now {alias!r} (aliases: {', '.join(rec['aliases'])})")


@app.command("report")
def report(model: str, version: str) -> None:
    """What upgrading each gallery of MODEL to VERSION would do, measured when the
    version was registered: plan, expected R@10, projected backfill time."""
    out = _guard(lambda: _client().report(model, version))
    console.print(f"report of {model}:{version}: {out['state']}")
    if out.get("error"):
        console.print(f"[red]{out['error']}[/red]")
    table = Table("gallery", "plan", "R@10 v1", "day one", "at 100 %", "backfill", "why")
    for name, g in (out.get("galleries") or {}).items():
        r10 = g.get("expected_r10") or {}
        cells = [r10.get(k) for k in ("r10_old_old", "r10_day_one", "r10_final")]
        eta = g.get("projected_backfill_s")
        table.add_row(
            name, g.get("plan", "?"), *(f"{c:.3f}" if c is not None else "-" for c in cells),
            f"{eta / 60:.1f} min" if eta is not None else "-", g.get("reason") or g.get("note", ""),
        )  # fmt: skip
    console.print(table)


@models_app.command("fit-adapter")
def models_fit_adapter(
    model: str,
    old_version: str,
    new_version: str,
    gallery: Annotated[str | None, typer.Option(help="sample pairs from its stored texts")] = None,
    texts: Annotated[Path | None, typer.Option(help="a file of texts, one per line")] = None,
    kind: Annotated[
        str, typer.Option(help="auto, procrustes, affine, lowrank, residual_mlp")
    ] = "auto",
    sample: int = 2000,
) -> None:
    """Fit and evaluate the adapters between two versions without an upgrade (logged to
    MLflow with their metrics and curves)."""
    lines = [t for t in texts.read_text().splitlines() if t.strip()] if texts else None
    body = {"model": model, "old_version": old_version, "new_version": new_version,
            "kind": kind, "gallery": gallery, "texts": lines, "sample": sample}  # fmt: skip
    with console.status("encoding the pairs and fitting"):
        out = _guard(lambda: _client().fit_adapter(body))
    table = Table("adapter", "kind", "id", "metrics")
    for name, a in out["adapters"].items():
        shown = ", ".join(f"{k} {v:.3f}" for k, v in a["metrics"].items())
        table.add_row(name, a["kind"], str(a["id"]), shown)
    console.print(f"{out['from']} -> {out['to']} on {out['pairs']} pairs")
    console.print(table)


@app.command("train-compatible")
def train_compatible(
    old: Annotated[
        str, typer.Argument(help="MODEL:VERSION the new version must stay compatible with")
    ],
    version: Annotated[str, typer.Argument(help="the new version, registered under OLD's model")],
    base: Annotated[
        str, typer.Option(help="shipped sentence-transformer or MODEL:VERSION")
    ] = "all-MiniLM-L6-v2",
    pairs: Annotated[
        Path | None,
        typer.Option(help="(query, relevant item text) lines: TSV, or JSON in a .jsonl"),
    ] = None,
    gallery: Annotated[
        str | None, typer.Option(help="train on its labelled probe and stored texts")
    ] = None,
    method: Annotated[str, typer.Option(help="bct, bt2 or oca")] = "bt2",
    extra_dims: Annotated[int, typer.Option(help="free dimensions beyond OLD's")] = 0,
    weight: Annotated[
        list[str] | None, typer.Option(help="TERM=W loss weight override (new, influence, ...)")
    ] = None,
    epochs: int = 1,
    batch_size: int = 64,
    seed: int = 0,
) -> None:
    """Fine-tune a sentence-transformer whose queries search OLD's stored vectors (no
    re-embedding), register it as VERSION with parent OLD, and report the run. Upgrading
    a gallery served by OLD to it serves `basis` from the first query."""
    body: dict[str, Any] = {
        "old": old, "version": version, "base": base, "gallery": gallery, "method": method,
        "extra_dims": extra_dims, "epochs": epochs, "batch_size": batch_size, "seed": seed,
        "pairs": _read_pairs(pairs) if pairs else None,
        "weights": _weights(weight or []) or None,
    }  # fmt: skip
    client = _client()
    out = _guard(lambda: client.train_compatible(body))
    if out["state"] not in ("done", "failed"):
        out = _watch_training(client, out["id"])
    if out["state"] != "done":
        console.print(f"[red]training run {out['id']} {out['state']}[/red]: {out.get('error')}")
        raise typer.Exit(code=1)
    result = out["result"]
    took, n = result.get("train_s", 0), result.get("pairs", "?")
    console.print(
        f"registered {result['registered']} ({result['dim']}-d) in {took:.0f}s on {n} pairs"
    )
    for epoch in result.get("heldout") or []:
        new_old = epoch.get("eval_heldout_new_old_r10", 0)
        new_new = epoch.get("eval_heldout_new_new_r10", 0)
        console.print(
            f"  epoch {epoch.get('epoch', 0):.0f}: held-out R@10 new/old {new_old:.3f}, "
            f"new/new {new_new:.3f}"
        )


def _weights(options: list[str]) -> dict[str, float]:
    """`--weight new=2 --weight align=0` → {"new": 2.0, "align": 0.0}."""
    out = {}
    for option in options:
        term, sep, value = option.partition("=")
        try:
            out[term.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise typer.BadParameter(f"--weight {option!r}: expected TERM=NUMBER")
    return out


def _read_pairs(path: Path) -> list[list[str]]:
    """A `.jsonl` file: JSON lines of two-string lists or {"query", "text"} objects;
    any other: tab-separated (query, item text) lines (a text may start with a bracket).
    The line number names a bad one."""
    rows: list[list[str]] = []
    as_json = path.suffix in (".jsonl", ".json", ".ndjson")
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            if as_json:
                value = json.loads(line)
                row = [value["query"], value["text"]] if isinstance(value, dict) else value
            else:
                row = line.split("\t")
        except (ValueError, KeyError) as exc:
            raise typer.BadParameter(f"{path}:{n}: not a pair ({type(exc).__name__})") from exc
        if not (isinstance(row, list) and len(row) == 2 and all(isinstance(t, str) for t in row)):
            raise typer.BadParameter(f"{path}:{n}: expected a query and an item text")
        rows.append(row)
    return rows


def _watch_training(client: Client, run_id: int, interval: float = 2.0) -> dict[str, Any]:
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()
    ) as bar:
        task = bar.add_task(f"training run {run_id}", total=None)
        while True:
            out = _guard(lambda: client.training(run_id))
            steps = out["progress"]
            bar.update(task, completed=steps["steps_done"], total=steps["steps_total"] or None,
                       description=f"training run {run_id} {out['state']}")  # fmt: skip
            if out["state"] in ("done", "failed"):
                return out
            if out.get("lapsed"):  # nobody holds it: the beat re-sends it, if one runs
                console.print(f"training run {run_id}: no sign of life for a whole lease")
                return out
            time.sleep(interval)


@app.command("demo")
def demo(
    queries: Annotated[int, typer.Option(help="labelled queries")] = 3000,
    gallery: Annotated[int, typer.Option(help="documents in the gallery")] = 12000,
) -> None:
    """Run (or resume) a whole real upgrade end to end on the embedded defaults."""
    from embcompat.demo import run_demo

    _local_only("demo")
    try:
        run_demo(Context(), queries, gallery, console)
    except KeyboardInterrupt:
        console.print("\ninterrupted: run `make demo` again to resume the upgrade where it stopped")
        raise typer.Exit(code=130) from None
    except EmbcompatError as exc:
        _fail(exc)


@gallery_app.command("create")
def gallery_create(name: str, model: str, version: str, index: IndexKind = IndexKind.FLAT) -> None:
    """Create a gallery served by MODEL:VERSION."""
    body = {"name": name, "model": model, "version": version, "index_kind": str(index)}
    rec = _guard(lambda: _client().create_gallery(body))
    console.print(
        f"gallery {rec['name']!r} serves {model}:{rec['serving_version']} ({rec['index_kind']})"
    )


@gallery_app.command("list")
def gallery_list() -> None:
    """List galleries."""
    table = Table("gallery", "model", "serving", "index", "plan")
    for g in _guard(lambda: _client().list_galleries()):
        table.add_row(g["name"], g["model"], g["serving_version"], g["index_kind"], g["plan"] or "")
    console.print(table)


@gallery_app.command("ingest")
def gallery_ingest(
    name: str,
    path: Annotated[Path, typer.Argument(help="JSON lines: {id, text} or {id, vector}")],
    batch: int = 1000,
) -> None:
    """Add or update items from a JSON-lines file, in batches, with a progress bar."""
    client = _client()
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    items = [
        {"id": str(r["id"]), **{k: r[k] for k in ("text", "vector", "metadata") if k in r}}
        for r in rows
    ]
    added = updated = 0
    for start in track(range(0, len(items), batch), description="ingest"):
        part = items[start : start + batch]
        out = _guard(lambda: client.ingest(name, part))  # noqa: B023 - called at once
        added, updated = added + out["added"], updated + out["updated"]
    _guard(lambda: client.publish(name))
    console.print(f"{added} added, {updated} updated; index published")


@gallery_app.command("publish")
def gallery_publish(name: str, index: IndexKind | None = None) -> None:
    """Publish fresh index generations; `--index` switches the gallery's index kind."""
    out = _guard(lambda: _client().publish(name, str(index) if index else None))
    console.print(f"published {', '.join(f'{k}: generation {v}' for k, v in out.items())}")


@gallery_app.command("probe")
def gallery_probe(
    name: str,
    path: Annotated[
        Path | None, typer.Argument(help="JSON lines {text, relevant: [item ids]}; none: show")
    ] = None,
) -> None:
    """Store the gallery's labelled probe (the gate and registration reports measure
    plans with it), or show what the stored one holds."""
    client = _client()
    if path is not None:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        out = _guard(lambda: client.set_probe(name, rows))
    else:
        out = _guard(lambda: client.probe(name))
    console.print(
        f"probe of {name!r}: {out['queries']} queries, {out['resolved']} of their "
        f"{out['relevant']} relevant items in the gallery"
    )


@gallery_app.command("stats")
def gallery_stats(name: str) -> None:
    """The gallery, items per version, spaces, index generations, bytes on disk."""
    _print_json(_guard(lambda: _client().gallery(name)))


@gallery_app.command("verify")
def gallery_verify(name: str) -> None:
    """Read every file of the gallery against its checksum; exit 1 when one fails."""
    report = _guard(lambda: _client().verify(name))
    _print_json(report)
    if report["problems"]:
        raise typer.Exit(1)


@gallery_app.command("repair")
def gallery_repair(name: str) -> None:
    """Rebuild damaged spaces from sound vectors and stored payloads; re-publish."""
    with console.status(f"repairing {name}"):
        report = _guard(lambda: _client().repair(name))
    _print_json(report)


def _parse_filters(specs: list[str]) -> dict[str, Any] | None:
    """`key=value` (repeat a key for any-of) → the filters of `search.search`."""
    out: dict[str, list[str]] = {}
    for spec in specs:
        key, sep, value = spec.partition("=")
        if not sep or not key:
            raise EmbcompatError(f"filter {spec!r} is not key=value")
        out.setdefault(key, []).append(value)
    return {k: v if len(v) > 1 else v[0] for k, v in out.items()} or None


@app.command("search")
def search_cmd(
    gallery: str,
    query: str,
    k: int = 10,
    filter: Annotated[
        list[str] | None, typer.Option(help="key=value on item metadata; repeat for more")
    ] = None,
) -> None:
    """Search a gallery with a text query; shows the version and path of each hit."""
    body = {"texts": [query], "k": k, "filters": _guard(lambda: _parse_filters(filter or []))}
    res = _guard(lambda: _client().search(gallery, body))
    table = Table("item", "score", "version", "path", "old", "new", "on the fly")
    for h in res["hits"][0]:
        fmt = lambda v: "" if v is None else f"{v:.3f}"  # noqa: E731
        table.add_row(
            h["item"], f"{h['score']:.4f}", h["version"], h["path"], fmt(h["score_old"]),
            fmt(h["score_new"]), "yes" if h["encoded_on_the_fly"] else "",
        )  # fmt: skip
    console.print(
        f"plan {res['plan']}, {res['latency_ms']:.0f} ms"
        + "".join(f"; {w}" for w in res["warnings"])
    )
    console.print(table)


@upgrade_app.command("plan")
def upgrade_plan(
    gallery: str, model: str, version: str, plan: UpgradePlan = UpgradePlan.AUTO
) -> None:
    """Dry run: items to re-embed, measured encoder throughput, projected time."""
    body = {"model": model, "version": version, "plan": str(plan)}
    _print_json(_guard(lambda: _client().plan_upgrade(gallery, body)))


@upgrade_app.command("start")
def upgrade_start(
    gallery: str,
    model: str,
    version: str,
    plan: UpgradePlan = UpgradePlan.AUTO,
    pairs: int = 2000,
    chunk_size: int = 1000,
    override: Annotated[
        bool, typer.Option(help="serve a requested bridge/mapped/basis plan without labels")
    ] = False,
) -> None:
    """Start an upgrade: on the workers if a broker is configured, else where the
    service runs (here, or the API server with --url)."""
    client = _client()
    body = {"model": model, "version": version, "plan": str(plan), "pairs": pairs,
            "chunk_size": chunk_size, "override": override}  # fmt: skip
    job = _guard(lambda: client.start_upgrade(gallery, body))
    console.print(
        f"upgrade job {job['id']} created for {gallery!r}: {job['from_version']} -> {version}"
    )
    console.print(f"job {job['id']}: {_guard(lambda: client.job(job['id']))['state']}")


@upgrade_app.command("status")
def upgrade_status(job_id: int) -> None:
    """State, plan, progress, rate and ETA of a job."""
    _print_json(_guard(lambda: _client().job(job_id)))


@upgrade_app.command("watch")
def upgrade_watch(job_id: int, interval: float = 1.0) -> None:
    """A progress bar until the job ends."""
    client = _client()
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()
    ) as bar:
        job = _guard(lambda: client.job(job_id))
        task = bar.add_task(f"job {job_id}", total=max(job["items_total"], 1))
        while True:
            job = _guard(lambda: client.job(job_id))
            bar.update(
                task, completed=job["items_done"], description=f"job {job_id} {job['state']}"
            )
            if job["state"] in TERMINAL_STATES:
                break
            time.sleep(interval)
    console.print(f"job {job_id}: {job['state']}" + (f" ({job['error']})" if job["error"] else ""))


def _control(action: str, job_id: int) -> None:
    job = _guard(lambda: _client().control(job_id, action))
    console.print(f"job {job_id}: {job['state']}")


@upgrade_app.command("pause")
def upgrade_pause(job_id: int) -> None:
    """Pause an upgrade job (search keeps serving its plan)."""
    _control("pause", job_id)


@upgrade_app.command("resume")
def upgrade_resume(job_id: int) -> None:
    """Resume a paused or failed job where it stopped."""
    _control("resume", job_id)


@upgrade_app.command("cancel")
def upgrade_cancel(job_id: int) -> None:
    """Cancel an upgrade job."""
    _control("cancel", job_id)


@upgrade_app.command("rollback")
def upgrade_rollback(job_id: int) -> None:
    """Serve the old version again at once; nothing stored is deleted."""
    _control("rollback", job_id)


@app.command("audit")
def audit_cmd(
    after: Annotated[int, typer.Option(help="show events after this id")] = 0,
    limit: int = 100,
    actor: Annotated[str | None, typer.Option(help="only this token name")] = None,
) -> None:
    """Admin actions: who (token name), what, when, and how each ended."""
    table = Table("id", "at", "actor", "action", "path", "status", "detail")
    for e in _guard(lambda: _client().audit(after, limit, actor)):
        table.add_row(
            str(e["id"]), e["at"][:19], e["actor"], e["action"], e["path"], str(e["status"]),
            json.dumps(e["detail"], sort_keys=True),
        )  # fmt: skip
    console.print(table)


@app.command("serve")
def serve(
    host: str = "127.0.0.1",
    port: int = 8000,
    migrate_db: Annotated[
        bool, typer.Option("--migrate/--no-migrate", help="migrate the database first")
    ] = True,
) -> None:
    """Run the admin API with uvicorn (limits and timeouts from EMBCOMPAT_* settings)."""
    import uvicorn

    from embcompat.api.server import server_config

    _local_only("serve")
    ctx = Context()
    url = ctx.settings.resolved_database_url
    if migrate_db:
        migrate.upgrade(url)
    elif (behind := migrate.pending(ctx.engine)) is not None:
        console.print(f"[red]error[/red]: {behind}; run `embcompat db upgrade` first")
        raise typer.Exit(code=2)
    ctx.close()
    uvicorn.Server(server_config(ctx.settings, host, port, log_level="info")).run()


@app.command("worker")
def worker(concurrency: int = 2, beat: bool = False) -> None:
    """Run a Celery worker on the configured broker (EMBCOMPAT_BROKER_URL)."""
    _local_only("worker")
    settings = Context().settings
    if settings.broker_url is None:
        console.print("[red]error[/red]: set EMBCOMPAT_BROKER_URL (e.g. redis://127.0.0.1:6379/0)")
        raise typer.Exit(code=2)
    args = [
        "celery",
        "-A",
        "embcompat.workers.main",
        "worker",
        f"--concurrency={concurrency}",
        "-Q",
        settings.queue,
        "--loglevel=INFO",
    ] + (["--beat"] if beat else [])
    os.execvp(sys.executable, [sys.executable, "-m", *args])
