"""The operations the CLI runs, two ways: `Local` calls the service layer in this process,
`Remote` calls the admin API's routes over HTTP (`--url`, `--token`). Both return the
JSON shapes of the API and raise `EmbcompatError` with the problem's code, message and
hint, so the CLI prints the same output and exits with the same code either way."""

from __future__ import annotations

import os
import pwd
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import httpx

from embcompat.adapters.select import CANDIDATES
from embcompat.errors import EmbcompatError, ServiceUnavailable
from embcompat.kinds import UpgradePlan
from embcompat.registry import versions
from embcompat.registry.audit import list_events, record_event
from embcompat.service import galleries, reports, search, training, upgrade
from embcompat.service.adapters import fit_standalone
from embcompat.service.context import Context

Json = dict[str, Any]
T = TypeVar("T")


class Client(Protocol):
    """What the CLI needs, in the API's terms (one method per route it uses)."""

    def register_version(self, model: str, body: Json) -> Json: ...
    def list_versions(self, model: str | None) -> list[Json]: ...
    def show_version(self, model: str, version: str) -> Json: ...
    def promote(self, model: str, version: str, alias: str) -> Json: ...
    def create_gallery(self, body: Json) -> Json: ...
    def list_galleries(self) -> list[Json]: ...
    def ingest(self, gallery: str, items: list[Json]) -> Json: ...
    def publish(self, gallery: str, index_kind: str | None = None) -> Json: ...
    def gallery(self, gallery: str) -> Json: ...
    def verify(self, gallery: str) -> Json: ...
    def set_probe(self, gallery: str, queries: list[Json]) -> Json: ...
    def probe(self, gallery: str) -> Json: ...
    def repair(self, gallery: str) -> Json: ...
    def search(self, gallery: str, body: Json) -> Json: ...
    def plan_upgrade(self, gallery: str, body: Json) -> Json: ...
    def start_upgrade(self, gallery: str, body: Json) -> Json: ...
    def job(self, job_id: int) -> Json: ...
    def control(self, job_id: int, action: str) -> Json: ...
    def audit(self, after: int, limit: int, actor: str | None) -> list[Json]: ...
    def fit_adapter(self, body: Json) -> Json: ...
    def report(self, model: str, version: str) -> Json: ...
    def train_compatible(self, body: Json) -> Json: ...
    def training(self, run_id: int) -> Json: ...


def _user() -> str:
    """The OS account (not $USER or $LOGNAME, which anyone can set)."""
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:  # no name for this uid (some containers)
        return f"uid-{os.getuid()}"


class Local:
    """The service layer in this process; an upgrade started or resumed here runs here
    (or on the workers, when a broker is configured), as the API's background task does.
    Admin actions go to the audit trail as `cli:<os user>`, as the API's go under the
    token's name."""

    def __init__(self, ctx: Context | None = None) -> None:
        self.ctx = ctx or Context()
        self.actor = f"cli:{_user()}"

    def _audited(
        self, action: str, detail: Json, run: Callable[[], T], counts: tuple[str, ...] = ()
    ) -> T:
        status = 200
        try:
            out = run()
            if isinstance(out, dict):
                detail = {**detail, **{k: out[k] for k in counts if k in out}}
            return out
        except EmbcompatError as exc:
            status = exc.http_status
            raise
        except Exception:
            status = 500
            raise
        finally:
            with self.ctx.session() as s:
                record_event(
                    s, actor=self.actor, action=action, method="CLI", path=f"cli {action}",
                    status=status, request_id="", detail=detail,
                )  # fmt: skip

    def register_version(self, model: str, body: Json) -> Json:
        def run() -> Json:
            with self.ctx.session() as s:
                return versions.register_version(
                    s, self.ctx.registry, model=model, **body,
                    models_dir=self.ctx.models_dir, policy=self.ctx.model_policy,
                ).to_dict()  # fmt: skip

        rec = self._audited("register_version", {"model": model}, run)
        return {**rec, "report": self._report_after(model, body["version"])}

    def _report_after(self, model: str, version: str) -> str | None:
        """As the API does: a version of a model that serves a gallery gets its report
        (measured here and now on the embedded default, else on the workers)."""
        from embcompat.workers.app import dispatch_report

        if not reports.request_report(self.ctx, model, version):
            return None
        return dispatch_report(self.ctx, model, version)

    def report(self, model: str, version: str) -> Json:
        return reports.get_report(self.ctx, model, version)

    def train_compatible(self, body: Json) -> Json:
        """Train here, with the trainer's progress bar, as the worker task would."""
        from embcompat.workers.app import report_registered

        def run() -> Json:
            run_id = training.request_training(self.ctx, **body)
            out = training.run_training(self.ctx, run_id, progress=True)
            report_registered(self.ctx, out)
            return out

        return self._audited(
            "train_compatible", {"old": body["old"], "version": body["version"]}, run
        )

    def training(self, run_id: int) -> Json:
        return training.get_training(self.ctx, run_id)

    def list_versions(self, model: str | None) -> list[Json]:
        with self.ctx.session() as s:
            return [r.to_dict() for r in versions.list_versions(s, self.ctx.registry, model)]

    def show_version(self, model: str, version: str) -> Json:
        with self.ctx.session() as s:
            rec = versions.get_version(s, self.ctx.registry, model, version)
            return {**rec.to_dict(), "lineage": versions.lineage(s, model, version)}

    def promote(self, model: str, version: str, alias: str) -> Json:
        def run() -> Json:
            with self.ctx.session() as s:
                return versions.promote(s, self.ctx.registry, model, version, alias).to_dict()

        rec = self._audited("promote", {"model": model, "version": version, "alias": alias}, run)
        if alias == "candidate":
            self._report_after(model, version)
        return rec

    def create_gallery(self, body: Json) -> Json:
        return self._audited(
            "create_gallery",
            {},
            lambda: galleries.create_gallery(
                self.ctx, body["name"], body["model"], body["version"], body["index_kind"]
            ).to_dict(),
        )

    def list_galleries(self) -> list[Json]:
        return [g.to_dict() for g in galleries.list_galleries(self.ctx)]

    def ingest(self, gallery: str, items: list[Json]) -> Json:
        rows = [
            galleries.ItemIn(str(i["id"]), i.get("text"), i.get("vector"), i.get("metadata"))
            for i in items
        ]
        return self._audited(
            "ingest",
            {"name": gallery},
            lambda: dict(galleries.ingest(self.ctx, gallery, rows)),
            counts=("added", "updated"),
        )

    def publish(self, gallery: str, index_kind: str | None = None) -> Json:
        return self._audited(
            "publish",
            {"name": gallery},
            lambda: dict(galleries.publish(self.ctx, gallery, index_kind)),
        )

    def gallery(self, gallery: str) -> Json:
        return {
            **galleries.get_gallery(self.ctx, gallery).to_dict(),
            **galleries.stats(self.ctx, gallery),
        }

    def verify(self, gallery: str) -> Json:
        return {"gallery": gallery, "problems": galleries.verify(self.ctx, gallery)}

    def set_probe(self, gallery: str, queries: list[Json]) -> Json:
        return self._audited(
            "set_probe", {"name": gallery}, lambda: galleries.set_probe(self.ctx, gallery, queries)
        )

    def probe(self, gallery: str) -> Json:
        return galleries.probe_summary(self.ctx, gallery)

    def fit_adapter(self, body: Json) -> Json:
        vectors = body.get("vectors")
        return self._audited(
            "fit_adapter",
            {k: body[k] for k in ("model", "old_version", "new_version")},
            lambda: fit_standalone(
                self.ctx, body["model"], body["old_version"], body["new_version"],
                kinds=tuple(CANDIDATES) if body.get("kind", "auto") == "auto" else (body["kind"],),
                gallery=body.get("gallery"), texts=body.get("texts"),
                vectors=(vectors["old"], vectors["new"]) if vectors else None,
                sample=body.get("sample", 2000),
            ),
        )  # fmt: skip

    def repair(self, gallery: str) -> Json:
        return self._audited(
            "repair_gallery",
            {"name": gallery},
            lambda: {"gallery": gallery, "spaces": galleries.repair(self.ctx, gallery)},
        )

    def search(self, gallery: str, body: Json) -> Json:
        return search.search(
            self.ctx, gallery, texts=body["texts"], k=body["k"], filters=body.get("filters")
        ).to_dict()

    def plan_upgrade(self, gallery: str, body: Json) -> Json:
        return upgrade.plan_upgrade(
            self.ctx, gallery, body["model"], body["version"], UpgradePlan(body["plan"])
        )

    def start_upgrade(self, gallery: str, body: Json) -> Json:
        from embcompat.workers.app import dispatch_upgrade

        job = self._audited(
            "start_upgrade",
            {"name": gallery},
            lambda: upgrade.start_upgrade(
                self.ctx,
                gallery,
                body["model"],
                body["version"],
                UpgradePlan(body["plan"]),
                body["pairs"],
                body["chunk_size"],
            ),  # fmt: skip
        )
        dispatch_upgrade(self.ctx, job.id)
        return job.to_dict()

    def job(self, job_id: int) -> Json:
        return upgrade.get_job(self.ctx, job_id).to_dict()

    def control(self, job_id: int, action: str) -> Json:
        fn = upgrade.CONTROLS[action]
        rec = self._audited(
            "control", {"job_id": job_id, "action": action}, lambda: fn(self.ctx, job_id)
        )
        if action == "resume":
            from embcompat.workers.app import dispatch_upgrade

            dispatch_upgrade(self.ctx, job_id)
        return rec.to_dict()

    def audit(self, after: int, limit: int, actor: str | None) -> list[Json]:
        with self.ctx.session() as s:
            return list_events(s, after, limit, actor)


def shown_url(url: str) -> str:
    """The URL without credentials it may carry (user:password@), for messages."""
    try:
        return str(httpx.URL(url).copy_with(username=None, password=None)).rstrip("/")
    except (httpx.InvalidURL, TypeError):
        return "the given URL"


class Remote:
    """The admin API at `url`, authenticated with `token`."""

    def __init__(self, url: str, token: str, timeout: float = 600.0) -> None:
        self.http = httpx.Client(
            base_url=url.rstrip("/"), headers={"Authorization": f"Bearer {token}"}, timeout=timeout
        )
        self.url = shown_url(url)

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ServiceUnavailable(
                f"cannot reach the embcompat API at {self.url}: {type(exc).__name__}",
                hint="check --url (EMBCOMPAT_URL) and that `embcompat serve` runs there",
            ) from exc
        if response.is_success:
            return response.json()
        try:
            problem = response.json()
        except ValueError:
            problem = {"detail": response.text[:200] or response.reason_phrase}
        error = EmbcompatError(str(problem.get("detail", "")), hint=problem.get("hint"))
        error.code = str(problem.get("code", f"http_{response.status_code}"))
        error.http_status = response.status_code
        raise error

    def _get(self, path: str, **kwargs: Any) -> Any:
        return self._call("GET", path, **kwargs)

    def _post(self, path: str, **kwargs: Any) -> Any:
        return self._call("POST", path, **kwargs)

    def register_version(self, model: str, body: Json) -> Json:
        return self._post(f"/models/{model}/versions", json=body)

    def report(self, model: str, version: str) -> Json:
        return self._get(f"/models/{model}/versions/{version}/report")

    def train_compatible(self, body: Json) -> Json:
        return self._post("/training", json={k: v for k, v in body.items() if v is not None})

    def training(self, run_id: int) -> Json:
        return self._get(f"/training/{run_id}")

    def list_versions(self, model: str | None) -> list[Json]:
        params = {"model": model} if model else {}
        return self._get("/models/versions", params=params)

    def show_version(self, model: str, version: str) -> Json:
        return self._get(f"/models/{model}/versions/{version}")

    def promote(self, model: str, version: str, alias: str) -> Json:
        return self._post(f"/models/{model}/versions/{version}/aliases/{alias}")

    def create_gallery(self, body: Json) -> Json:
        return self._post("/galleries", json=body)

    def list_galleries(self) -> list[Json]:
        return self._get("/galleries")

    def ingest(self, gallery: str, items: list[Json]) -> Json:
        return self._post(f"/galleries/{gallery}/items", json={"items": items})

    def publish(self, gallery: str, index_kind: str | None = None) -> Json:
        params = {"index_kind": index_kind} if index_kind else {}
        return self._post(f"/galleries/{gallery}/publish", params=params)

    def gallery(self, gallery: str) -> Json:
        return self._get(f"/galleries/{gallery}")

    def verify(self, gallery: str) -> Json:
        return self._post(f"/galleries/{gallery}/verify")

    def set_probe(self, gallery: str, queries: list[Json]) -> Json:
        return self._call("PUT", f"/galleries/{gallery}/probe", json={"queries": queries})

    def probe(self, gallery: str) -> Json:
        return self._get(f"/galleries/{gallery}/probe")

    def fit_adapter(self, body: Json) -> Json:
        return self._post("/adapters", json={k: v for k, v in body.items() if v is not None})

    def repair(self, gallery: str) -> Json:
        return self._post(f"/galleries/{gallery}/repair")

    def search(self, gallery: str, body: Json) -> Json:
        body = {k: v for k, v in body.items() if v is not None}
        return self._post(f"/galleries/{gallery}/search", json=body)

    def plan_upgrade(self, gallery: str, body: Json) -> Json:
        return self._post(f"/galleries/{gallery}/upgrades/plan", json=body)

    def start_upgrade(self, gallery: str, body: Json) -> Json:
        return self._post(f"/galleries/{gallery}/upgrades", json=body)

    def job(self, job_id: int) -> Json:
        return self._get(f"/upgrades/{job_id}")

    def control(self, job_id: int, action: str) -> Json:
        return self._post(f"/upgrades/{job_id}/{action}")

    def audit(self, after: int, limit: int, actor: str | None) -> list[Json]:
        params: Json = {"after": after, "limit": limit, **({"actor": actor} if actor else {})}
        return self._get("/audit", params=params)
