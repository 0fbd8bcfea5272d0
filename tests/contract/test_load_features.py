"""`serve-app load-features` against a real redis-server: validation, refusals, idempotence."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from serve_app.offline.cli import main
from serve_app.offline.datagen import generate_entities
from serve_app.stores.redis import META_KEY, feature_key
from tests.services import RedisServer


def _csv(tmp_path: Path) -> Path:
    frame = generate_entities(200, 7).reset_index().astype(object)
    frame.loc[3, "income"] = "lots"
    frame.loc[5, "region"] = "mars"
    frame.loc[7, "entity_id"] = ""
    frame.loc[9, "age"] = float("inf")
    frame.loc[11, "entity_id"] = "_meta"  # would overwrite the store's metadata key
    frame = pd.concat([frame, frame.iloc[[10]]])  # a duplicate id
    frame["extra"] = 1
    path = tmp_path / "features.csv"
    frame.to_csv(path, index=False)
    return path


def test_bad_rows_are_refused_with_reasons_and_reloading_is_idempotent(
    redis_srv: RedisServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    client = redis_srv.client()
    client.flushdb()
    source, rejects = _csv(tmp_path), tmp_path / "rejects.csv"
    args = ["load-features", "--to", redis_srv.url, "--from", str(source), "--quiet"]
    assert main([*args, "--rejects", str(rejects)]) == 1
    out = capsys.readouterr().err
    assert "loaded 195 rows" in out and "refused 6" in out and "['extra']" in out
    reasons = pd.read_csv(rejects)
    assert list(reasons["row"]) == [4, 6, 8, 10, 12, 201]
    assert "income: 'lots' is not a number" in reasons["reason"][0]
    assert "not one of north" in reasons["reason"][1]
    assert "not finite" in reasons["reason"][3] and "reserved" in reasons["reason"][4]
    assert "duplicate" in reasons["reason"][5]
    keys_once = sorted(client.keys("serve_app:features:v1:*"))
    assert main(args) == 1  # the same input again: the same store
    assert sorted(client.keys("serve_app:features:v1:*")) == keys_once
    assert len(keys_once) == 195 + 1  # rows and the _meta key
    row = json.loads(client.get(feature_key("E0000000")))
    assert isinstance(row["age"], float) and row["region"] in ("north", "south", "east", "west")
    assert json.loads(client.get(META_KEY))["rows"] == 195
    assert client.get(feature_key("E0000003")) is None
    client.close()


def test_missing_columns_refuse_the_whole_input(
    redis_srv: RedisServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "thin.csv"
    pd.DataFrame({"entity_id": ["E1"], "age": [3]}).to_csv(path, index=False)
    assert main(["load-features", "--to", redis_srv.url, "--from", str(path), "--quiet"]) == 2
    assert "lacks the columns" in capsys.readouterr().err


def test_parquet_input(redis_srv: RedisServer, tmp_path: Path) -> None:
    path = tmp_path / "features.parquet"
    generate_entities(50, 3).reset_index().to_parquet(path)
    args = ["load-features", "--to", redis_srv.url, "--from", str(path), "--quiet"]
    assert main(args) == 0


@pytest.mark.parametrize(
    "entity_id", ["E 1", " E1", "E1\n", "caf\u00e9", "a/b", "E" * 65, "E1;DROP", "_meta"]
)
def test_an_id_the_api_would_refuse_is_refused_at_load(entity_id: str) -> None:
    """Loaded, such an id could never be looked up: the API refuses it."""
    from serve_app.offline.load_features import validate_row

    row = generate_entities(1, 7).reset_index().iloc[0].to_dict()
    validate_row(row)  # the generated id itself loads
    with pytest.raises(ValueError, match="entity_id"):
        validate_row({**row, "entity_id": entity_id})


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("latin1.csv", "entity_id,age\nE1,caf\xe9\n".encode("latin-1")),
        ("ragged.csv", b"entity_id,age\nE1,3\nE2,3,4,5\n"),
        ("fake.parquet", b"not parquet at all"),
    ],
)
def test_an_unreadable_input_is_exit_2_with_its_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, content: bytes
) -> None:
    """Exit 1 means "rows were refused"; an input that cannot be read at all is 2, with
    the file named, not a traceback. Nothing is sent: the port is closed."""
    path = tmp_path / name
    path.write_bytes(content)
    assert main(["load-features", "--to", "redis://127.0.0.1:1", "--from", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"cannot read {path}" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("to", "says"),
    [
        ("redis://:s3cr3t-pw@127.0.0.1:1/0", "ConnectionError"),  # nothing listens there
        ("redis://:s3cr3t-pw@127.0.0.1:6379/${SERVE_APP_TEST_UNSET_VAR}", "unset environment"),
    ],
    ids=["unreachable", "unset-variable"],
)
def test_an_unusable_destination_is_exit_2_in_one_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    to: str,
    says: str,
) -> None:
    """A Redis that is down or a URL with an unset variable was a traceback and exit 1,
    the code of "rows were refused". Now 2 and one line, without the password."""
    monkeypatch.delenv("SERVE_APP_TEST_UNSET_VAR", raising=False)
    assert main(["load-features", "--quiet", "--to", to, "--from", str(_csv(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("load-features: ") and says in err, err
    assert "Traceback" not in err and "s3cr3t-pw" not in err and err.count("\n") == 1, err
