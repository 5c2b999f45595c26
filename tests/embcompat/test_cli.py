"""The CLI over the service layer, against a real SQLite DB and MLflow store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from embcompat.cli import app


@pytest.fixture
def runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setenv("EMBCOMPAT_DATA_DIR", str(tmp_path / "data"))
    return CliRunner()


def test_db_upgrade_register_list_show_promote(runner: CliRunner) -> None:
    assert runner.invoke(app, ["db", "upgrade"]).exit_code == 0
    out = runner.invoke(app, ["models", "register", "vendor", "a", "--dim", "8", "--external"])
    assert out.exit_code == 0, out.output
    out = runner.invoke(
        app, ["models", "register", "vendor", "b", "--dim", "8", "--external", "--parent", "a"]
    )
    assert out.exit_code == 0, out.output
    assert runner.invoke(app, ["models", "promote", "vendor", "b"]).exit_code == 0
    listing = runner.invoke(app, ["models", "list"]).output
    assert "vendor" in listing and "serving" in listing
    shown = json.loads(runner.invoke(app, ["models", "show", "vendor", "b"]).output)
    assert shown["lineage"] == ["a", "b"] and shown["aliases"] == ["serving"]


def test_bad_input_exits_2_with_the_reason(runner: CliRunner) -> None:
    runner.invoke(app, ["db", "upgrade"])
    runner.invoke(app, ["models", "register", "vendor", "a", "--dim", "8", "--external"])
    dup = runner.invoke(app, ["models", "register", "vendor", "a", "--dim", "8", "--external"])
    assert dup.exit_code == 2 and "already has a version 'a'" in dup.output
    unknown = runner.invoke(app, ["models", "promote", "vendor", "zz"])
    assert unknown.exit_code == 2 and "no version 'zz'" in unknown.output
    two_sources = runner.invoke(
        app, ["models", "register", "m", "v", "--dim", "8", "--external", "--shipped", "x"]
    )
    assert two_sources.exit_code == 2 and "exactly one of" in two_sources.output


def test_gallery_ingest_search_and_upgrade_refusal_from_the_cli(
    runner: CliRunner, tmp_path: Path
) -> None:
    runner.invoke(app, ["db", "upgrade"])
    runner.invoke(app, ["models", "register", "vendor", "a", "--dim", "3", "--external"])
    assert runner.invoke(app, ["gallery", "create", "g", "vendor", "a"]).exit_code == 0
    lines = [json.dumps({"id": f"i{i}", "vector": [1.0, float(i), 0.0]}) for i in range(5)]
    (tmp_path / "items.jsonl").write_text("\n".join(lines))
    out = runner.invoke(app, ["gallery", "ingest", "g", str(tmp_path / "items.jsonl")])
    assert out.exit_code == 0 and "5 added" in out.output, out.output
    stats = json.loads(runner.invoke(app, ["gallery", "stats", "g"]).output)
    assert stats["items"] == 5 and stats["items_per_version"] == {"a": 5}
    refused = runner.invoke(app, ["upgrade", "start", "g", "vendor", "a"])
    assert refused.exit_code == 2 and "already serves vendor:a" in refused.output
    missing = runner.invoke(app, ["upgrade", "status", "42"])
    assert missing.exit_code == 2 and "no upgrade job 42" in missing.output


def test_search_filters_parse_from_key_value_options() -> None:
    from embcompat.cli import _parse_filters
    from embcompat.errors import EmbcompatError

    got = _parse_filters(["color=red", "size=M", "color=blue", "note=a=b"])
    assert got == {"color": ["red", "blue"], "size": "M", "note": "a=b"}
    assert _parse_filters([]) is None
    with pytest.raises(EmbcompatError, match="'color' is not key=value"):
        _parse_filters(["color"])


def test_remote_errors_never_show_credentials_of_the_url(runner: CliRunner) -> None:
    url = "http://operator:hunter2-pw@127.0.0.1:9"  # nothing listens on port 9
    out = runner.invoke(app, ["--url", url, "--token", "tok-abcdef-123", "models", "list"])
    assert out.exit_code == 2 and "cannot reach" in out.output
    assert "hunter2" not in out.output and "tok-abcdef" not in out.output


def test_train_compatible_names_the_bad_pairs_line_and_the_missing_version(
    runner: CliRunner, tmp_path: Path
) -> None:
    runner.invoke(app, ["db", "upgrade"])
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("a query\tits item\n\nno tab on this line\n")
    out = runner.invoke(app, ["train-compatible", "text:v1", "v2", "--pairs", str(pairs)])
    assert out.exit_code == 2 and "pairs.tsv:3" in out.output, out.output
    rows = [json.dumps({"query": f"query {i}", "text": f"item {i}"}) for i in range(200)]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(rows))
    out = runner.invoke(app, ["train-compatible", "text:v1", "v2", "--pairs", str(pairs)])
    assert out.exit_code == 2 and "has no version 'v1'" in out.output, out.output
    bad = runner.invoke(
        app, ["train-compatible", "text:v1", "v2", "--pairs", str(pairs), "--weight", "new"]
    )
    assert bad.exit_code == 2 and "expected TERM=NUMBER" in bad.output, bad.output
