"""The `embcompat` command line: thin over the same service functions as the API."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from embcompat import migrate
from embcompat.context import Context
from embcompat.errors import EmbcompatError
from registry import versions
from registry.schema import Metric

app = typer.Typer(help="Backward-compatible embedding model upgrades.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
models_app = typer.Typer(
    help="Embedding model versions in the MLflow registry.", no_args_is_help=True
)
app.add_typer(db_app, name="db")
app.add_typer(models_app, name="models")
console = Console()


def _fail(exc: EmbcompatError) -> None:
    console.print(f"[red]error[/red] ({exc.code}): {exc.message}")
    if exc.hint:
        console.print(f"hint: {exc.hint}")
    raise typer.Exit(code=2)


@db_app.command("upgrade")
def db_upgrade(revision: str = "head") -> None:
    """Apply the Alembic migrations to the configured database."""
    ctx = Context()
    migrate.upgrade(ctx.settings.resolved_database_url, revision)
    console.print(f"database at {revision}: {ctx.settings.resolved_database_url}")


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
    """Register MODEL:VERSION from exactly one source."""
    sources = {"shipped": shipped, "dir": from_dir, "mlflow": mlflow_uri}
    chosen = [k for k, v in sources.items() if v] + (["external"] if external else [])
    if len(chosen) != 1:
        console.print(
            "[red]error[/red]: give exactly one of --shipped, --from-dir, --mlflow-uri, --external"
        )
        raise typer.Exit(code=2)
    ctx = Context()
    try:
        with ctx.session() as s:
            rec = versions.register_version(
                s,
                ctx.registry,
                model=model,
                version=version,
                dim=dim,
                source=chosen[0],  # type: ignore[arg-type]
                location=sources.get(chosen[0]),
                metric=metric,
                parent=parent,
                models_dir=ctx.models_dir,
            )
    except EmbcompatError as exc:
        _fail(exc)
    console.print(
        f"registered {rec.ref} (MLflow {rec.mlflow_name} v{rec.mlflow_version}, dim {rec.dim})"
    )


@models_app.command("list")
def models_list(model: Annotated[str | None, typer.Argument()] = None) -> None:
    """List registered versions with their aliases."""
    ctx = Context()
    try:
        with ctx.session() as s:
            recs = versions.list_versions(s, ctx.registry, model)
    except EmbcompatError as exc:
        _fail(exc)
    table = Table("model", "version", "dim", "metric", "encoder", "parent", "aliases")
    for r in recs:
        table.add_row(
            r.model,
            r.version,
            str(r.dim),
            r.metric,
            r.encoder_uri,
            r.parent or "",
            ",".join(r.aliases),
        )
    console.print(table)


@models_app.command("show")
def models_show(model: str, version: str) -> None:
    """Show one version as JSON, with its lineage."""
    ctx = Context()
    try:
        with ctx.session() as s:
            rec = versions.get_version(s, ctx.registry, model, version)
            chain = versions.lineage(s, model, version)
    except EmbcompatError as exc:
        _fail(exc)
    json.dump({**rec.to_dict(), "lineage": chain}, sys.stdout, indent=2)
    sys.stdout.write("\n")


@models_app.command("promote")
def models_promote(model: str, version: str, alias: str = "serving") -> None:
    """Point an alias (serving or candidate) at MODEL:VERSION."""
    ctx = Context()
    try:
        with ctx.session() as s:
            rec = versions.promote(s, ctx.registry, model, version, alias)
    except EmbcompatError as exc:
        _fail(exc)
    console.print(f"{rec.ref} is now {alias!r} (aliases: {', '.join(rec.aliases)})")


@app.command("demo")
def demo(
    queries: Annotated[int, typer.Option(help="labelled queries")] = 3000,
    gallery: Annotated[int, typer.Option(help="documents in the gallery")] = 12000,
) -> None:
    """Run (or resume) a whole real upgrade end to end on the embedded defaults."""
    from embcompat.demo import run_demo

    try:
        run_demo(Context(), queries, gallery, console)
    except KeyboardInterrupt:
        console.print("\ninterrupted: run `make demo` again to resume the upgrade where it stopped")
        raise typer.Exit(code=130) from None
    except EmbcompatError as exc:
        _fail(exc)
