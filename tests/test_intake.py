"""Admission (repository/intake.py) as an outside party meets it: every attack of the issue
that was once accepted and fused, through the library, through `coldfusion contribute`, and
through real HTTP against `coldfusion serve` with its default settings. Each is refused with
the rule it broke, or (one party sending several uploads) weighed once."""

import json

import httpx
import pytest
import torch
from safetensors.torch import load, save, save_file
from test_service import Service, invoke, issue, wait_for_version

from coldfusion.repository import Repository
from coldfusion.repository.intake import Refused
from coldfusion.repository.refs import BadReference, parse_ref


def moved(base: dict, by: float, seed: int = 0) -> dict:
    """An honest-sized update: every float entry moved by about `by` (seeded noise)."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + by * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in base.items()}


def overlapping(base: dict) -> bytes:
    """A safetensors file with the base's names, dtypes and shapes, every tensor's bytes at offset 0."""
    data = save({k: v.contiguous() for k, v in base.items()})
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    for key, info in header.items():
        if key != "__metadata__":
            info["data_offsets"] = [0, info["data_offsets"][1] - info["data_offsets"][0]]
    head = json.dumps(header).encode()
    longest = max(i["data_offsets"][1] for k, i in header.items() if k != "__metadata__")
    return len(head).to_bytes(8, "little") + head + data[8 + size:8 + size + longest]


def attacks(base: dict) -> list[tuple[str, bytes, dict, int, str]]:
    """(what, payload bytes, encoding, declared examples, the rule that refuses it)."""
    full_as_delta = {k: v.to(torch.float16) for k, v in base.items() if v.is_floating_point()}
    return [
        ("tensors sharing bytes", overlapping(base), {"kind": "full"}, 10, "format"),
        ("a full body sent as a delta", save(full_as_delta), {"kind": "delta", "dtype": "float16"}, 10, "norm"),
        ("an empty sparse payload", save({}), {"kind": "sparse", "density": 0.01, "dtype": "float16",
                                               "score": "magnitude"}, 10, "no-op"),
        ("the unchanged base", save(base), {"kind": "full"}, 10, "no-op"),
        ("an update scaled 1000x, alone", save(moved(base, 1e-3 * 1000, seed=9)), {"kind": "full"}, 10, "norm"),
        ("a trillion examples", save(moved(base, 1e-3, seed=8)), {"kind": "full"}, 10**12, "examples"),
    ]


def test_every_attack_is_refused_at_admission_with_its_rule_and_nothing_is_stored(repo):
    base = repo.load_version(1)
    for what, data, encoding, examples, rule in attacks(base):
        with pytest.raises(Refused) as refused:
            repo.add_contribution(data, base_version=1, contributor="mallory", task="t", num_examples=examples,
                                  encoding=encoding)
        assert refused.value.rule == rule, (what, str(refused.value))
        assert str(refused.value).startswith(f"refused ({rule}): ")
    assert repo.contributions() == [] and [r.rule for r in repo.refusals("mallory")] == [a[-1] for a in attacks(base)]
    assert repo.verify().ok


def test_the_same_payload_is_admitted_once_whatever_base_it_claims(repo):
    base = repo.load_version(1)
    first = repo.add_contribution(moved(base, 1e-3, seed=1), base_version=1, contributor="a", task="t",
                                  num_examples=5)
    repo.fuse(1, [first.id])
    with pytest.raises(Refused, match=r"refused \(duplicate\): .* as contribution 1, which it sent against version 1"):
        repo.add_contribution(moved(base, 1e-3, seed=1), base_version=2, contributor="a", task="t", num_examples=5)
    with pytest.raises(Refused, match="which another contributor sent"):
        repo.add_contribution(moved(base, 1e-3, seed=1), base_version="latest", contributor="b", task="t",
                              num_examples=5)


def test_a_held_back_or_unknown_base_is_refused(repo):
    base = repo.load_version(1)
    c = repo.add_contribution(moved(base, 1e-3, seed=1), base_version=1, contributor="a", task="t", num_examples=5)
    held = repo.fuse(1, [c.id])
    repo.hold_back(held.id, "scores 3 points below version 1")
    for ref, why in [(2, "version 2 is held back (scores 3 points below version 1)"), (7, "no version 7"),
                     ("v²", "a version is 'latest', an id"), ("%%%%%%%%", "a version is 'latest', an id")]:
        with pytest.raises(Refused, match=r"refused \(base\)") as refused:
            repo.add_contribution(moved(base, 1e-3, seed=2), base_version=ref, contributor="a", task="t",
                                  num_examples=5)
        assert why in str(refused.value)
    assert repo.resolve("latest").id == 1  # a held-back version is never latest


def test_version_references_follow_one_rule():
    assert parse_ref("latest").latest and parse_ref("3").id == 3 and parse_ref("v3").id == 3
    assert parse_ref("0123abcd").prefix == "0123abcd" and parse_ref("DEADBEEF00").prefix == "deadbeef00"
    for bad in ["²", "v²", "٣", "9" * 5000, "%", "_", "abc%", "a_b", "abcdef1", "", "latest ", "-1", "v", "0x12345678"]:
        with pytest.raises(BadReference, match="a version is 'latest', an id"):
            parse_ref(bad)


def test_a_contributor_counts_once_per_fusion_whatever_it_sends(repo):
    """alice sends three near-identical uploads, bob one: the fused body is the mean of alice's
    newest and bob's, as if each had sent one."""
    base = repo.load_version(1)
    near = [{k: v + i * 1e-6 if v.is_floating_point() else v for k, v in moved(base, 1e-3, seed=1).items()}
            for i in range(3)]
    alice = [repo.add_contribution(body, base_version=1, contributor="alice", task="t", num_examples=10)
             for body in near]
    bob = repo.add_contribution(moved(base, 1e-3, seed=5), base_version=1, contributor="bob", task="t",
                                num_examples=10)
    v = repo.fuse(1, [c.id for c in [*alice, bob]])
    assert v.fusion["contributions"] == [alice[-1].id, bob.id]
    expected = {k: (repo.load(alice[-1].sha256)[k].double() + repo.load(bob.sha256)[k].double()) / 2 for k in base}
    assert all(torch.allclose(repo.load_version(v.id)[k].double(), expected[k], atol=1e-6) for k in base
               if base[k].is_floating_point())
    assert [c.status for c in repo.contributions()] == ["refused", "refused", "fused", "fused"]


def test_weighted_fusion_weighs_declared_examples_only_up_to_the_cap(repo):
    from coldfusion.repository.validation import ValidationSettings

    base = repo.load_version(1)
    rules = ValidationSettings(max_examples=1000)
    with pytest.raises(Refused, match=r"refused \(examples\): 1001 examples: declare between 1 and the operator's "
                                      r"cap max_examples = 1000"):
        repo.add_contribution(moved(base, 1e-3, seed=1), base_version=1, contributor="a", task="t",
                              num_examples=1001, rules=rules)
    a = repo.add_contribution(moved(base, 1e-3, seed=1), base_version=1, contributor="a", task="t",
                              num_examples=1000, rules=rules)
    b = repo.add_contribution(moved(base, 1e-3, seed=2), base_version=1, contributor="b", task="t", num_examples=10,
                              rules=rules)
    assert repo.fuse(1, [a.id, b.id], method="weighted").fusion["contributions"] == [a.id, b.id]


def test_every_attack_is_refused_through_coldfusion_contribute(repo, tmp_path):
    base = repo.load_version(1)
    for i, (what, data, encoding, examples, rule) in enumerate(attacks(base)):
        if encoding["kind"] != "full":
            continue  # contribute sends bodies; encoded payloads come over HTTP (below)
        (tmp_path / f"{i}.safetensors").write_bytes(data)
        result = invoke("contribute", repo.root, tmp_path / f"{i}.safetensors", "--base", "latest", "--contributor",
                        "mallory", "--task", "t", "--examples", examples)
        assert result.exit_code == 2 and "Traceback" not in result.output, (what, result.output)
        expected = "byte ranges must not overlap" if rule == "format" else f"refused ({rule})"
        assert expected in result.text, (what, result.text)
    save_file(moved(base, 1e-3, seed=3), tmp_path / "ok.safetensors")
    for ref in ("²", "v²", "9" * 5000, "%", "_"):
        odd = invoke("contribute", repo.root, tmp_path / "ok.safetensors", "--base", ref, "--contributor", "a",
                     "--task", "t", "--examples", 5)
        assert odd.exit_code == 2 and "a version is 'latest', an id" in odd.text, odd.output
        exported = invoke("export", repo.root, ref, tmp_path / "out")
        assert exported.exit_code == 2 and "a version is 'latest', an id" in exported.text, exported.output
    assert repo.contributions() == []


def test_every_attack_is_refused_over_http_and_a_sybil_weighs_once(repo, tmp_path):
    base = repo.load_version(1)
    mallory, alice, bob = issue(repo, "mallory"), issue(repo, "alice"), issue(repo, "bob")
    with Service(repo.root, {"fusion": {"when_waiting": 4, "poll_seconds": 0.2}}) as service:  # default rules

        def post(token, who, data, encoding=None, examples=10, ref="1"):
            return httpx.post(f"{service.url}/v1/contributors/{who}/contributions", content=data,
                              params={"base": ref, "task": "t", "examples": examples,
                                      "encoding": json.dumps(encoding or {"kind": "full"})},
                              headers={"Authorization": f"Bearer {token}"}, timeout=60)

        for what, data, encoding, examples, rule in attacks(base):
            reply = post(mallory, "mallory", data, encoding, examples)
            assert reply.status_code == 422, (what, reply.text)
            assert reply.json()["detail"].startswith(f"refused ({rule})"), (what, reply.text)
        for ref in ("²", "v²", "9" * 5000, "%25", "_", "abc%25", "12345678%25"):
            got = httpx.get(f"{service.url}/v1/versions/{ref}")
            assert got.status_code in (404, 422) and "Traceback" not in got.text, (ref, got.text)
            assert post(mallory, "mallory", save(moved(base, 1e-3, seed=7)), ref=ref).status_code == 422
        assert httpx.get(f"{service.url}/v1/versions/{'0' * 8}").status_code == 404  # a well-formed prefix, unknown
        uploads = [(alice, "alice", moved(base, 1e-3, seed=1)), (alice, "alice", moved(base, 1e-3, seed=2)),
                   (alice, "alice", moved(base, 1e-3, seed=3)), (bob, "bob", moved(base, 1e-3, seed=4))]
        for token, who, body in uploads:
            assert post(token, who, save(body)).status_code == 201
        v2 = wait_for_version(service.url, 2)
        assert v2["contributions"] == [3, 4]  # alice once (her newest), bob once
        fused = Repository(repo.root).load_version(2)
        assert all(torch.allclose(fused[k], (uploads[2][2][k] + uploads[3][2][k]) / 2, atol=1e-6) for k in base
                   if base[k].is_floating_point())
        again = post(bob, "bob", save(uploads[3][2]), ref="2")  # the same bytes, claiming another base
        assert again.status_code == 422 and "refused (duplicate)" in again.json()["detail"]
        rules = [r["rule"] for r in httpx.get(f"{service.url}/v1/contributors/mallory/history",
                                              headers={"Authorization": f"Bearer {mallory}"}).json()["refused_uploads"]]
        # (the 5000-digit reference is longer than the query allows: a 422 before admission, not recorded)
        assert rules == [a[-1] for a in attacks(base)] + ["base"] * 6
    assert invoke("verify", repo.root).exit_code == 0


def test_a_version_the_operators_suite_has_not_ruled_on_cannot_be_claimed(repo, tmp_path, toy_task_files):
    base = repo.load_version(1)
    c = repo.add_contribution(moved(base, 1e-3, seed=1), base_version=1, contributor="a", task="t", num_examples=5)
    repo.fuse(1, [c.id])  # version 2: fused by the operator, not yet ruled on
    alice = issue(repo, "alice")
    suite = {"tasks": [{"name": "sentiment", "path": str(toy_task_files["sentiment"])}], "max_length": 16,
             "threads": 1, "precision": "fp32"}
    with Service(repo.root, {"fusion": {"enabled": False}, "suite": suite}) as service:
        reply = httpx.post(f"{service.url}/v1/contributors/alice/contributions", content=save(moved(base, 1e-3, 2)),
                           params={"base": 2, "task": "t", "examples": 5}, headers={"Authorization": f"Bearer {alice}"})
        assert reply.status_code == 422
        assert reply.json()["detail"].startswith("refused (base): version 2 is not published yet")
        assert httpx.get(f"{service.url}/v1/versions/latest").json()["id"] == 1


def test_an_upload_is_inspected_as_it_arrives_and_not_read_again(repo, monkeypatch):
    """Over HTTP a full body is inspected while its bytes arrive: admission does not read the
    file again (here, reading it would fail), and finds what reading the file would find."""
    from fastapi.testclient import TestClient

    from coldfusion.io.tensorfile import SafetensorsReader
    from coldfusion.repository import intake
    from coldfusion.repository.validation import inspect_contribution
    from coldfusion.service.app import create_app
    from coldfusion.service.settings import ServiceSettings
    from coldfusion.service.tokens import ServiceStore

    base = repo.load_version(1)
    token = ServiceStore(repo.root).issue("alice")
    client = TestClient(create_app(repo.root, ServiceSettings(fusion={"enabled": False})))

    def post(data: bytes):
        return client.post("/v1/contributors/alice/contributions", content=data,
                           params={"base": 1, "task": "t", "examples": 10},
                           headers={"Authorization": f"Bearer {token}"})

    def no_second_read(*args, **kwargs):
        raise AssertionError("admission read the upload again")

    monkeypatch.setattr(intake, "examine", no_second_read)
    good = moved(base, 1e-3, seed=1)
    reply = post(save(good))
    assert reply.status_code == 201, reply.text
    stored = Repository(repo.root).contributions()[0]
    with SafetensorsReader([repo.path_of(stored.sha256)]) as body, SafetensorsReader([repo.path_of(
            repo.version(1).sha256)]) as reference:
        assert stored.delta_norm == pytest.approx(inspect_contribution(body, reference).delta_norm, rel=1e-6)
    nan = moved(base, 1e-3, seed=2)
    nan[sorted(nan)[-1]].view(-1)[0] = float("nan")
    assert post(save(nan)).json()["detail"].startswith("refused (finite)")
    shared = [a for a in attacks(base) if a[-1] == "format"][0][1]
    assert post(shared).json()["detail"].startswith("refused (format)")
    assert post(save(moved(base, 1.0, seed=3))).json()["detail"].startswith("refused (norm)")
    assert post(save({"x": torch.zeros(2)})).json()["detail"].startswith("refused (architecture)")


def test_a_streamed_inspection_refuses_what_does_not_add_up(repo):
    """Bytes that stop short of the header's layout, or a header longer than the upload
    declared, are a format fault, whatever the chunk sizes; a whole body in any chunking
    finds the same norm as reading the file."""
    from coldfusion.repository.intake import Claim, start_inspection

    base = repo.load_version(1)
    data = save(moved(base, 1e-3, seed=4))
    claim = Claim("alice", "t", 1, 10)

    def streamed(payload: bytes, size: int, chunk: int):
        inspection = start_inspection(repo, claim, size)
        for at in range(0, len(payload), chunk):
            inspection.check(inspection.feed(payload[at:at + chunk]))
        return inspection.result()[1]

    from coldfusion.repository.validation import InMemory, inspect_contribution

    read = inspect_contribution(InMemory(load(data)), InMemory(base))
    for chunk in (7, 4096, len(data)):
        found = streamed(data, len(data), chunk)
        assert found.problem is None and found.delta_norm == pytest.approx(read.delta_norm, rel=1e-9)
    short = streamed(data[:-10], len(data), 4096)
    assert short.rule == "format" and "bytes arrived" in short.problem
    claimed = streamed(data, 100, 4096)  # declared 100 bytes; the header alone is longer
    assert claimed.rule == "format"
    assert start_inspection(repo, Claim("alice", "t", 1, 10, {"kind": "delta"}), len(data)) is None
    assert start_inspection(repo, claim, None) is None  # no declared size: admission reads the file
