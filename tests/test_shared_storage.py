"""A repository in shared storage: its index in a real PostgreSQL server, its bodies in a real
S3 server (SeaweedFS), both on 127.0.0.1; and two service replicas over them, fed at once,
fusing every contribution exactly once into one line of versions."""

import threading
import uuid

import boto3
import httpx
import psycopg
import pytest
import torch
from safetensors.torch import save
from servers import S3_KEYS
from test_service import Service, invoke, issue, wait_for_version
from transformers import AutoModel

from coldfusion.io.checkpoint import sha256_bytes
from coldfusion.models.encoder import body_tensors
from coldfusion.repository import Repository

KEY = "encoder.layer.0.output.dense.bias"


@pytest.fixture
def shared(postgres, s3, monkeypatch):
    """Options of `coldfusion storage` for a fresh database and prefix, and the S3 keys set."""
    for name, value in S3_KEYS.items():
        monkeypatch.setenv(name, value)
    name = f"t{uuid.uuid4().hex[:12]}"
    return {"index": postgres.new_database(name), "objects": f"s3://coldfusion/{name}", "s3_endpoint": s3.endpoint}


def attach(root, shared) -> Repository:
    result = invoke("storage", root, "--index", shared["index"], "--objects", shared["objects"],
                    "--s3-endpoint", shared["s3_endpoint"])
    assert result.exit_code == 0, result.output
    return Repository(root, create=False)


def bucket_keys(shared) -> set[str]:
    client = boto3.client("s3", endpoint_url=shared["s3_endpoint"], region_name="us-east-1")
    prefix = shared["objects"].removeprefix("s3://coldfusion/") + "/"
    return {o["Key"][len(prefix):] for o in client.list_objects_v2(Bucket="coldfusion", Prefix=prefix)["Contents"]}


def shifted(tensors: dict, by: float) -> dict:
    return {k: v + by if v.is_floating_point() else v for k, v in tensors.items()}


def test_a_repository_in_postgresql_and_s3_is_the_same_repository_from_any_directory(shared, tmp_path,
                                                                                    tiny_model_dir):
    first = attach(tmp_path / "replica-a", shared)
    base = body_tensors(AutoModel.from_pretrained(tiny_model_dir))
    v1 = first.add_version(base, model_source=str(tiny_model_dir))
    c1 = first.add_contribution(shifted(base, 0.01), base_version=1, contributor="alice", task="t", num_examples=10)
    c2 = first.add_contribution(shifted(base, 0.03), base_version=1, contributor="bob", task="t", num_examples=10)
    with pytest.raises(Exception, match="duplicate"):
        first.add_contribution(shifted(base, 0.01), base_version=1, contributor="alice", task="t", num_examples=10)
    v2 = first.fuse(1, [c1.id, c2.id])
    assert torch.allclose(first.load_version(2)[KEY], base[KEY] + 0.02, atol=1e-6)  # the average of the two

    # the bodies are in the bucket, the rows in PostgreSQL
    assert {f"objects/{sha}.safetensors" for sha in (v1.sha256, v2.sha256, c1.sha256, c2.sha256)} <= bucket_keys(shared)
    assert any(k.startswith("files/") for k in bucket_keys(shared))  # the model's config and tokenizer
    with psycopg.connect(shared["index"]) as db:
        assert db.execute("SELECT id, parent FROM versions ORDER BY id").fetchall() == [(1, None), (2, 1)]
        assert db.execute("SELECT id, fused_into FROM contributions ORDER BY id").fetchall() == [(1, 2), (2, 2)]

    # another directory on the same storage: a replica with an empty cache sees and reads everything
    second = attach(tmp_path / "replica-b", shared)
    assert not list((tmp_path / "replica-b" / "objects").iterdir())
    assert [v.id for v in second.versions()] == [1, 2]
    assert torch.equal(second.load_version(2)[KEY], first.load_version(2)[KEY])
    first.record_metrics(2, "t", "linear_probe", {"accuracy": 0.75})
    assert first.record_metrics(2, "t", "verdict", {"published": True}, run="suite", once=True)
    assert not second.record_metrics(2, "t", "verdict", {"published": False}, run="suite", once=True)
    assert second.record_metrics(2, "t", "verdict", {"published": False}, once=True)  # no run: another key
    assert [(m["task"], m["values"]) for m in second.metrics(2)] == [
        ("t", {"accuracy": 0.75}), ("t", {"published": True}), ("t", {"published": False})]
    sent = second.contributions()[0]
    assert type(sent.num_bytes) is int and sent.num_bytes == second.path_of(c1.sha256).stat().st_size
    exported = invoke("export", tmp_path / "replica-b", "2", tmp_path / "out")
    assert exported.exit_code == 0, exported.output
    assert torch.allclose(body_tensors(AutoModel.from_pretrained(tmp_path / "out"))[KEY], base[KEY] + 0.02, atol=1e-6)
    assert invoke("verify", tmp_path / "replica-a").exit_code == 0

    # an object no index row names (a replica's upload before its transaction) is kept while young
    client = boto3.client("s3", endpoint_url=shared["s3_endpoint"], region_name="us-east-1")
    stray = f"{sha256_bytes(b'not indexed yet')}.safetensors"
    client.put_object(Bucket="coldfusion", Key=f"{shared['objects'].removeprefix('s3://coldfusion/')}/objects/{stray}",
                      Body=b"not indexed yet")
    kept = invoke("verify", tmp_path / "replica-b", "--clean")
    assert kept.exit_code == 0 and "except 1 younger than 60 minutes" in kept.text
    assert f"objects/{stray}" in bucket_keys(shared)
    cleaned = invoke("verify", tmp_path / "replica-b", "--clean", "--min-age", "0")
    assert cleaned.exit_code == 0 and "deleted: 0 temporary files, 1 unindexed objects" in cleaned.text
    assert f"objects/{stray}" not in bucket_keys(shared)

    # damage in the bucket is found from any replica (a copy that does not match its name is not cached)
    key = f"{shared['objects'].removeprefix('s3://coldfusion/')}/objects/{c1.sha256}.safetensors"
    client.put_object(Bucket="coldfusion", Key=key, Body=save(shifted(base, 0.5)))
    third = attach(tmp_path / "replica-c", shared)
    report = third.verify()
    assert report.problems == [f"{c1.sha256}.safetensors: does not match its checksum (corrupt)"]
    checked = invoke("verify", tmp_path / "replica-c")
    assert checked.exit_code == 1 and "corrupt" in checked.text


def test_bad_storage_settings_are_clear_errors_and_leave_nothing(shared, tmp_path, postgres):
    root = tmp_path / "r"
    with_password = shared["index"].replace("coldfusion@", "coldfusion:secret@")
    refused = invoke("storage", root, "--index", with_password, "--objects", shared["objects"])
    assert refused.exit_code != 0 and "PGPASSWORD" in refused.text and not (root / "storage.json").exists()
    not_s3 = invoke("storage", root, "--index", shared["index"], "--objects", "/tmp/bucket")
    assert not_s3.exit_code != 0 and "s3://bucket/prefix" in not_s3.text
    unreachable = invoke("storage", root, "--index", f"postgresql://coldfusion@127.0.0.1:{postgres.port + 1}/x",
                         "--objects", shared["objects"], "--s3-endpoint", shared["s3_endpoint"])
    assert unreachable.exit_code != 0 and "cannot reach the repository's index" in unreachable.text
    assert not (root / "storage.json").exists()
    assert not isinstance(unreachable.exception, Exception) or isinstance(unreachable.exception, SystemExit)

    attach(root, shared)  # a working replica whose operator then mistypes the server: its settings stay
    kept = (root / "storage.json").read_text()
    again = invoke("storage", root, "--index", f"postgresql://coldfusion@127.0.0.1:{postgres.port + 1}/x",
                   "--objects", shared["objects"], "--s3-endpoint", shared["s3_endpoint"])
    assert again.exit_code != 0 and (root / "storage.json").read_text() == kept


@pytest.mark.parametrize("content, reason", [
    ("{not json", "is not valid storage settings"),
    ('{"index": "mysql://x/y"}', "is not a postgresql:// URL"),
    ('{"objects": "s3://b/p", "bucket_policy": "public"}', "Extra inputs are not permitted"),
])
def test_a_damaged_storage_json_is_a_clear_error(tmp_path, content, reason):
    root = tmp_path / "replica"
    root.mkdir()
    (root / "storage.json").write_text(content)
    result = invoke("verify", root)
    assert result.exit_code != 0 and reason in result.text and "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)


def test_two_replicas_over_postgresql_and_s3_fuse_every_contribution_exactly_once(shared, tmp_path, tiny_model_dir):
    repo_a = attach(tmp_path / "replica-a", shared)
    attach(tmp_path / "replica-b", shared)
    base = body_tensors(AutoModel.from_pretrained(tiny_model_dir))
    repo_a.add_version(base, model_source=str(tiny_model_dir))
    names = [f"party{i}" for i in range(6)]
    tokens = {name: issue(repo_a, name) for name in names}  # issued through one replica, valid on both
    fast = {"fusion": {"when_waiting": 2, "poll_seconds": 0.1, "after_seconds": 3600}}
    env = {**S3_KEYS}
    with Service(tmp_path / "replica-a", fast, env) as a, Service(tmp_path / "replica-b", fast, env) as b:
        statuses: list[int] = []

        def contributor(i: int, name: str) -> None:
            for round_ in range(3):  # each party sends three different bodies, alternating replicas
                url = (a, b)[(i + round_) % 2].url
                payload = save(shifted(base, 0.001 * (1 + i + 10 * round_)))
                reply = httpx.post(f"{url}/v1/contributors/{name}/contributions",
                                   params={"base": 1, "task": "t", "examples": 10}, content=payload,
                                   headers={"Authorization": f"Bearer {tokens[name]}"}, timeout=60)
                statuses.append(reply.status_code)

        threads = [threading.Thread(target=contributor, args=(i, n)) for i, n in enumerate(names)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert statuses == [201] * 18
        repo = Repository(tmp_path / "replica-b", create=False)
        wait_for_version(b.url, 2)
        for _ in range(600):
            if not repo.uploads_waiting():
                break
            threading.Event().wait(0.1)
        assert not repo.uploads_waiting()
        logs = a.output() + b.output()

    contributions = repo.contributions()
    versions = [v for v in repo.versions() if not v.abandoned]
    listed = [c for v in versions for c in (v.fusion or {}).get("contributions", [])]
    # a party counts once per fusion: an older upload still waiting beside its newer one is superseded
    assert len(contributions) == 18 and all(c.status == "fused" or c.reason.startswith("superseded: ")
                                            for c in contributions)
    assert sorted(listed) == [c.id for c in contributions if c.status == "fused"]  # each in one version's record
    by_id = {c.id: c.contributor for c in contributions}
    assert all(len({by_id[c] for c in v.fusion["contributions"]}) == len(v.fusion["contributions"])
               for v in versions[1:])
    assert [v.parent for v in versions] == [None] + [v.id for v in versions[:-1]]  # one line, no fork
    assert invoke("verify", tmp_path / "replica-a").exit_code == 0
    assert "Traceback" not in logs or "got there first" in logs
