"""The always-on repository through real HTTP on 127.0.0.1: `coldfusion serve` in its own
process, contributors through the CLI (`token`, `pull`, `push`) and raw requests; every
refusal; SIGKILL mid-upload and mid-fusion, then restart."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
import yaml
from safetensors.torch import save_file
from transformers import AutoModel, BertForSequenceClassification
from typer.testing import CliRunner

from coldfusion.cli import app
from coldfusion.encodings import EncodingSettings
from coldfusion.models.encoder import body_tensors
from coldfusion.repository import Repository
from coldfusion.repository.validation import ValidationSettings

runner = CliRunner()


def invoke(*args, env=None):
    result = runner.invoke(app, [str(a) for a in args], env=env)
    result.text = " ".join(result.output.split())  # rich wraps long lines
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    """`coldfusion serve` in a child process on 127.0.0.1, stopped by its PID."""

    def __init__(self, repo: Path, settings: dict, env: dict | None = None):
        self.repo, self.port = repo, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = repo.parent / f"service-{self.port}.yaml"
        config.write_text(yaml.safe_dump(settings))
        self.log = open(repo.parent / f"service-{self.port}.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "coldfusion", "serve", str(repo), "--port", str(self.port), "--config", str(config)],
            stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        deadline = time.time() + 60
        while True:
            try:
                httpx.get(self.url + "/v1/versions", timeout=2).raise_for_status()
                return
            except httpx.HTTPError:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.stop()
                    raise RuntimeError(f"the service did not start: {self.output()}") from None
                time.sleep(0.2)

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def moved(repo: Repository, by: float, version: int = 1) -> dict:
    return {k: v + by if v.is_floating_point() else v for k, v in repo.load_version(version).items()}


def issue(repo: Repository, name: str) -> str:
    result = invoke("token", "issue", repo.root, name)
    assert result.exit_code == 0, result.output
    return result.text.split(":", 1)[1].strip()


def wait_for_version(url: str, n: int, timeout: float = 60) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        versions = httpx.get(url + "/v1/versions").json()
        if len(versions) >= n:
            return versions[n - 1]
        time.sleep(0.2)
    raise AssertionError(f"no version {n} after {timeout} s")


FAST = {"fusion": {"when_waiting": 2, "poll_seconds": 0.2, "after_seconds": 3600}}
# The harmful update of the suite's tests (a body of zeros) is as large as the base itself, which
# admission refuses by default; there the suite is the defence under test.
NO_NORM_BOUND = {"base_norm_factor": None}


def test_two_contributors_pull_push_and_the_service_fuses_when_two_wait(repo, tmp_path, tiny_model_dir):
    alice, bob = issue(repo, "alice"), issue(repo, "bob")
    with Service(repo.root, FAST) as service:
        pulled = invoke("pull", service.url, "latest", tmp_path / "v1")
        assert pulled.exit_code == 0, pulled.output
        model = AutoModel.from_pretrained(tmp_path / "v1")  # what a contributor finetunes
        assert torch.equal(body_tensors(model)["encoder.layer.0.output.dense.bias"],
                           repo.load_version(1)["encoder.layer.0.output.dense.bias"])
        save_file(moved(repo, 0.01), tmp_path / "alice.safetensors")
        classifier = BertForSequenceClassification.from_pretrained(tmp_path / "v1", num_labels=2)
        with torch.no_grad():
            for p in classifier.bert.parameters():
                p.add_(0.03)
        classifier.save_pretrained(tmp_path / "bob")  # a model directory: reduced to its body before it is sent

        first = invoke("push", service.url, tmp_path / "alice.safetensors", "--base", 1, "--task", "sentiment",
                       "--examples", 100, "--token", alice)
        assert first.exit_code == 0, first.output
        assert "stored contribution 1" in first.text and "against version 1: waiting" in first.text
        time.sleep(0.6)  # one waits: not yet fused (k = 2)
        assert len(httpx.get(service.url + "/v1/versions").json()) == 1
        second = invoke("push", service.url, tmp_path / "bob", "--base", 1, "--task", "topic", "--examples", 100,
                        env={"COLDFUSION_TOKEN": bob})
        assert second.exit_code == 0, second.output

        v2 = wait_for_version(service.url, 2)
        assert v2["parent"] == 1 and v2["contributions"] == [1, 2] and v2["method"] == "average"
        key = "encoder.layer.0.output.dense.bias"
        assert torch.allclose(repo.load_version(2)[key], repo.load_version(1)[key] + 0.02, atol=1e-6)
        again = invoke("pull", service.url, "2", tmp_path / "v2")
        assert again.exit_code == 0, again.output
        assert torch.allclose(body_tensors(AutoModel.from_pretrained(tmp_path / "v2"))[key],
                              repo.load_version(2)[key])
        history = httpx.get(service.url + "/v1/contributors/alice/history",
                            headers={"Authorization": f"Bearer {alice}"}).json()
        assert [(c["id"], c["status"], c["fused_into"]) for c in history["contributions"]] == [(1, "fused", 2)]
    assert invoke("verify", repo.root).exit_code == 0


def test_two_asynchronous_contributor_loops_improve_the_base_together(repo, tmp_path, toy_task_files):
    """`coldfusion contribute-loop` in two processes: each pulls the newest base, finetunes on
    its own task, pushes, waits for a newer base; the service fuses every two."""
    tokens = {name: issue(repo, name) for name in ("sentiment", "topic")}
    with Service(repo.root, FAST) as service:
        loops = []
        for name, token in tokens.items():
            config = tmp_path / f"{name}.yaml"
            config.write_text(yaml.safe_dump({
                "task": {"name": name, "path": str(toy_task_files[name])}, "rounds": 2, "examples_per_round": 120,
                "finetune": {"epochs": 1, "batch_size": 16, "lr": 1e-3}, "poll_seconds": 0.2, "threads": 1,
                "precision": "fp32", "max_length": 16}))
            log = open(tmp_path / f"{name}.log", "w")
            loops.append((subprocess.Popen(
                [sys.executable, "-m", "coldfusion", "contribute-loop", service.url, str(config),
                 "--workdir", str(tmp_path / f"work-{name}")],
                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "COLDFUSION_TOKEN": token}), log))
        try:
            for proc, log in loops:
                assert proc.wait(timeout=300) == 0, Path(log.name).read_text()
        finally:
            for proc, log in loops:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                log.close()
        v3 = wait_for_version(service.url, 3)
        assert v3["parent"] == 2 and len(v3["contributions"]) == 2
    contributions = Repository(repo.root).contributions()
    assert sorted((c.contributor, c.base_version, c.fused_into) for c in contributions) == [
        ("sentiment", 1, 2), ("sentiment", 2, 3), ("topic", 1, 2), ("topic", 2, 3)]
    assert all(c.num_examples == 120 for c in contributions)
    for name in tokens:
        out = (tmp_path / f"{name}.log").read_text()
        assert "round 2: trained on version 2" in " ".join(out.split()) and "2 contributions sent" in out


def test_a_fused_base_that_scores_worse_on_the_operators_suite_is_held_back(repo, tmp_path, toy_task_files):
    alice = issue(repo, "alice")
    suite = {"tasks": [{"name": "sentiment", "path": str(toy_task_files["sentiment"])}], "margin": 5.0,
             "evaluation": {"train_examples": 200, "validation_examples": 60, "test_examples": 100},
             "max_length": 16, "threads": 1, "precision": "fp32"}
    settings = {"fusion": {"when_waiting": 1, "poll_seconds": 0.2, "validation": NO_NORM_BOUND}, "suite": suite}
    headers = {"Authorization": f"Bearer {alice}"}
    with Service(repo.root, settings) as service:
        url = service.url + "/v1/contributors/alice/contributions?task=t&examples=10&base="
        zeros = {k: torch.zeros_like(v) if v.is_floating_point() else v for k, v in repo.load_version(1).items()}
        save_file(zeros, tmp_path / "zeros.safetensors")  # every text the same vector: a harmful update
        assert httpx.post(url + "1", content=(tmp_path / "zeros.safetensors").read_bytes(),
                          headers=headers).status_code == 201
        for held in (2, 3):  # held back, requeued onto the published base, fused again, held back again
            harmful = wait_for_version(service.url, held)
            deadline = time.time() + 120
            while not harmful["held_back"] and time.time() < deadline:
                time.sleep(0.3)
                harmful = httpx.get(service.url + f"/v1/versions/{held}").json()
            assert harmful["status"] == "held_back" and "below version 1" in harmful["held_back"]
            assert harmful["parent"] == 1 and not harmful["abandoned"]
            assert httpx.get(service.url + "/v1/versions/latest").json()["id"] == 1  # not published
        history = httpx.get(service.url + "/v1/contributors/alice/history", headers=headers).json()["contributions"]
        assert [(c["id"], c["status"], c["fused_into"], c["requeued_as"]) for c in history] == [
            (1, "requeued", 2, 2), (2, "refused", 3, None)]
        assert "held back" in history[1]["reason"] and "requeued once (from contribution 1)" in history[1]["reason"]
        claimed = httpx.post(url + "2", content=(tmp_path / "zeros.safetensors").read_bytes(), headers=headers)
        assert claimed.status_code == 422 and "refused (base): version 2 is held back" in claimed.json()["detail"]
        pulled = invoke("pull", service.url, 2, tmp_path / "held")
        assert pulled.exit_code == 0 and "warning: version 2 is held back, not a published version" in pulled.text
        assert "Not a published version: held back." in (tmp_path / "held" / "README.md").read_text()
        save_file(moved(repo, 1e-4), tmp_path / "small.safetensors")
        assert httpx.post(url + "latest", content=(tmp_path / "small.safetensors").read_bytes(),
                          headers=headers).status_code == 201
        good = wait_for_version(service.url, 4)
        deadline = time.time() + 120
        while httpx.get(service.url + "/v1/versions/latest").json()["id"] != 4 and time.time() < deadline:
            time.sleep(0.3)
        good = httpx.get(service.url + "/v1/versions/4").json()
        assert good["parent"] == 1 and good["status"] == "live"  # fused onto the published base, and published
        latest = invoke("pull", service.url, "latest", tmp_path / "latest")
        assert latest.exit_code == 0 and "version 4 written" in latest.text and "warning" not in latest.text
    verdicts = {v: [m["values"] for m in Repository(repo.root).metrics(v) if m["task"] == "publication"]
                for v in (2, 3, 4)}
    assert verdicts[2][0]["published"] is False and verdicts[2][0]["score"] < verdicts[2][0]["parent_score"] - 5
    assert verdicts[3][0]["published"] is False and verdicts[4][0]["published"] is True
    assert invoke("verify", repo.root).exit_code == 0


def test_a_contribute_loop_whose_contribution_is_held_back_twice_trains_again(repo, tmp_path, toy_task_files,
                                                                                monkeypatch):
    """The loop's first payload is harmful (a body of zeros, put in its place here): its fusion is
    held back, requeued, held back again and refused; the loop does not wait for a base that
    will never come, trains again on the published base, and its second contribution is fused."""
    import coldfusion.service.contribute_loop as loop_module
    from coldfusion.contributors.encodings import Encoding
    from coldfusion.service.client import ServiceClient

    alice = issue(repo, "alice")
    suite = {"tasks": [{"name": "sentiment", "path": str(toy_task_files["sentiment"])}], "margin": 5.0,
             "evaluation": {"train_examples": 200, "validation_examples": 60, "test_examples": 100},
             "max_length": 16, "threads": 1, "precision": "fp32"}
    honest, sent = Encoding.payload, []

    def first_one_harmful(self, model, base):
        sent.append(1)
        if len(sent) == 1:
            return {k: torch.zeros_like(v) if v.is_floating_point() else v for k, v in base.items()}
        return honest(self, model, base)

    monkeypatch.setattr(Encoding, "payload", first_one_harmful)
    config = loop_module.ContributeLoopConfig.model_validate({
        "task": {"name": "topic", "path": str(toy_task_files["topic"])}, "rounds": 2, "examples_per_round": 120,
        "finetune": {"epochs": 1, "batch_size": 16, "lr": 1e-3}, "poll_seconds": 0.2, "threads": 1,
        "precision": "fp32", "max_length": 16})
    settings = {"fusion": {"when_waiting": 1, "poll_seconds": 0.2, "validation": NO_NORM_BOUND}, "suite": suite}
    rounds, deadline = [], time.time() + 240
    with Service(repo.root, settings) as service, ServiceClient(service.url, alice) as client:
        pushed = loop_module.contribute_loop(client, config, tmp_path / "work", on_round=rounds.append,
                                             stop=lambda: time.time() > deadline)
        assert pushed == 2 and [r["base"] for r in rounds] == [1, 1], rounds
        wait_for_version(service.url, 4)
        history = client._get("/v1/contributors/alice/history").json()["contributions"]
    assert [(c["id"], c["status"], c["fused_into"]) for c in history] == [
        (1, "requeued", 2), (2, "refused", 3), (3, "fused", 4)]


def test_contribute_loop_sends_lora_factors_and_fish_updates_and_keeps_its_head_across_restarts(
        repo, tmp_path, toy_task_files):
    """The one contributor behind contribute-loop: LoRA and a FISH mask travel as they do in a
    run (factors; the masked entries), the service decodes and fuses them, and a restarted
    loop takes up its round count and its head where it stopped."""
    from coldfusion.service.client import ServiceClient
    from coldfusion.service.contribute_loop import ContributeLoopConfig, contribute_loop

    tokens = {name: issue(repo, name) for name in ("sentiment", "topic")}
    encodings = {"sentiment": {"kind": "lora", "lora": {"r": 2, "target_modules": ["query", "value"]}},
                 "topic": {"kind": "sparse", "score": "fisher", "density": 0.05}}
    with Service(repo.root, FAST) as service:
        rounds = {}
        for name, token in tokens.items():
            config = ContributeLoopConfig.model_validate({
                "task": {"name": name, "path": str(toy_task_files[name])}, "rounds": 1, "examples_per_round": 120,
                "finetune": {"epochs": 1, "batch_size": 16, "lr": 1e-3}, "poll_seconds": 0.2, "threads": 1,
                "precision": "fp32", "max_length": 16, "contribution": encodings[name], "fisher_examples": 32})
            with ServiceClient(service.url, token) as client:
                rounds[name] = []
                contribute_loop(client, config, tmp_path / f"work-{name}", on_round=rounds[name].append)
        v2 = wait_for_version(service.url, 2)
        assert sorted(v2["contributions"]) == [1, 2]
        stored = {c.contributor: c for c in Repository(repo.root).contributions()}
        assert stored["sentiment"].encoding["kind"] == "lora" and stored["sentiment"].encoding["r"] == 2
        assert stored["topic"].encoding == {"kind": "sparse", "dtype": "float16", "density": 0.05,
                                            "score": "fisher"}
        assert (tmp_path / "work-topic" / "heads" / "topic" / "iter0000.safetensors").exists()
        config = config.model_copy(update={"contribution": EncodingSettings(kind="delta")})
        with ServiceClient(service.url, tokens["topic"]) as client:  # a restart: round 2, on version 2
            contribute_loop(client, config, tmp_path / "work-topic", on_round=rounds["topic"].append)
    assert [(r["round"], r["base"]) for r in rounds["topic"]] == [(1, 1), (2, 2)]
    assert sorted(p.name for p in (tmp_path / "work-topic" / "heads" / "topic").iterdir()) == [
        "iter0000.safetensors", "iter0001.safetensors"]


def test_two_replicas_judging_the_same_version_agree_and_record_one_verdict(repo, toy_task_files):
    """Replicas poll on their own, so two may rule on one fused base at once: both read the
    scores the first stored, reach the same verdict, and only one verdict row is kept."""
    from coldfusion.service.settings import SuiteSettings
    from coldfusion.service.suite import RUN, VERDICT, OperatorSuite, judged

    settings = SuiteSettings.model_validate({
        "tasks": [{"name": "sentiment", "path": str(toy_task_files["sentiment"])}], "margin": 5.0,
        "evaluation": {"train_examples": 200, "validation_examples": 60, "test_examples": 100},
        "max_length": 16, "threads": 1, "precision": "fp32"})
    zeros = {k: torch.zeros_like(v) if v.is_floating_point() else v for k, v in repo.load_version(1).items()}
    c = repo.add_contribution(zeros, base_version=1, contributor="alice", task="t", num_examples=10,
                              rules=ValidationSettings(**NO_NORM_BOUND))
    harmful = repo.fuse(1, [c.id])
    first, second = OperatorSuite(settings), OperatorSuite(settings)
    assert not judged(repo, harmful)  # what both replicas saw before either ruled
    reason = first.judge(repo, harmful)
    assert reason and "below version 1" in reason
    assert second.judge(repo, repo.version(harmful.id)) == reason
    assert [(x.id, x.status) for x in repo.contributions()] == [(1, "requeued"), (2, "waiting")]  # requeued once
    rows = [(m["task"], m["protocol"]) for v in (1, 2) for m in repo.metrics(v) if m["run"] == RUN]
    assert sorted(rows) == [("publication", "verdict"), ("sentiment", "linear_probe"), ("sentiment", "linear_probe")]
    assert repo.version(harmful.id).held_back == reason and repo.version(harmful.id).status == "held_back"
    [verdict] = [m["values"] for m in repo.metrics(2) if m["task"] == VERDICT]
    assert verdict["published"] is False


def test_every_refusal_has_its_status_and_reason_and_stores_nothing(repo, tmp_path):
    alice, bob = issue(repo, "alice"), issue(repo, "bob")
    body = moved(repo, 0.01)
    save_file(body, tmp_path / "ok.safetensors")
    size = (tmp_path / "ok.safetensors").stat().st_size
    limit = size * 3 / (1024 * 1024)  # one body fits; four do not
    settings = {"max_upload_mb": limit, "read_timeout_seconds": 1.0, "fusion": {"enabled": False}}
    with Service(repo.root, settings) as service:
        url = service.url + "/v1/contributors/alice/contributions?base=1&task=t&examples=10"
        ok = (tmp_path / "ok.safetensors").read_bytes()

        def post(content, token=alice, headers=None):
            return httpx.post(url, content=content, headers={**({"Authorization": f"Bearer {token}"} if token else {}),
                                                             **(headers or {})}, timeout=30)

        assert post(ok, token=None).status_code == 401
        assert post(ok, token="cf_not-a-token").status_code == 401
        wrong = post(ok, token=bob)
        assert wrong.status_code == 403 and "belongs to bob, not to alice" in wrong.json()["detail"]
        assert post(ok * 4).status_code == 413  # declared length over the limit: refused before reading

        def streamed():  # no declared length: refused as it streams past the limit
            for _ in range(8):
                yield ok
        try:
            assert post(streamed()).status_code == 413
        except httpx.TransportError:
            pass  # the server may close the connection while the client still sends; the log below shows it
        garbage = post(b"\x00" * 100)
        assert garbage.status_code == 422 and "refused (format): against version 1: the upload: not a readable " \
            "safetensors file" in garbage.json()["detail"]
        save_file({"x": torch.zeros(3)}, tmp_path / "other.safetensors")
        other = post((tmp_path / "other.safetensors").read_bytes())
        assert other.status_code == 422 and "not the base's architecture" in other.json()["detail"]
        poisoned = dict(body)
        poisoned["embeddings.word_embeddings.weight"] = poisoned["embeddings.word_embeddings.weight"].clone()
        poisoned["embeddings.word_embeddings.weight"][0, 0] = float("nan")
        save_file(poisoned, tmp_path / "nan.safetensors")
        nan = post((tmp_path / "nan.safetensors").read_bytes())
        assert nan.status_code == 422 and "non-finite" in nan.json()["detail"]
        bad_task = httpx.post(url.replace("task=t", "task=../../x"), content=ok,
                              headers={"Authorization": f"Bearer {alice}"})
        assert bad_task.status_code == 422 and "refused (name)" in bad_task.json()["detail"]
        no_base = httpx.post(url.replace("base=1", "base=9"), content=ok, headers={"Authorization": f"Bearer {alice}"})
        assert no_base.status_code == 422 and "refused (base): no version 9" in no_base.json()["detail"]

        with socket.create_connection(("127.0.0.1", service.port)) as stall:  # says 1000 bytes, sends 10
            stall.sendall(f"POST /v1/contributors/alice/contributions?base=1&task=t&examples=10 HTTP/1.1\r\n"
                          f"Host: x\r\nAuthorization: Bearer {alice}\r\nContent-Length: 1000\r\n\r\n".encode()
                          + b"0123456789")
            stall.settimeout(20)
            assert b" 408 " in stall.recv(4096).split(b"\r\n")[0] + b" "

        assert Repository(repo.root).contributions() == []  # nothing refused was stored
        stored = post(ok)
        assert stored.status_code == 201 and stored.json()["id"] == 1
        duplicate = post(ok)
        assert duplicate.status_code == 422 and "refused (duplicate)" in duplicate.json()["detail"]
        history = httpx.get(service.url + "/v1/contributors/alice/history",
                            headers={"Authorization": f"Bearer {alice}"}).json()
        rules = [r["rule"] for r in history["refused_uploads"]]  # every refusal recorded once, with its rule
        assert rules.count("size") >= 1 and "stalled" in rules
        assert [r for r in rules if r not in ("size", "stalled")] == [
            "format", "architecture", "finite", "name", "base", "duplicate"]
        assert httpx.get(service.url + "/v1/contributors/alice/history",
                         headers={"Authorization": f"Bearer {bob}"}).status_code == 403
        assert invoke("token", "revoke", repo.root, "alice").exit_code == 0
        assert post(ok).status_code == 401
        assert httpx.get(service.url + "/v1/versions/1/files/..%2Findex.sqlite").status_code == 404
        missing = invoke("pull", service.url, "7", tmp_path / "nowhere")
        assert missing.exit_code == 2 and "refused (404)" in missing.text and not (tmp_path / "nowhere").exists()
    listing = invoke("token", "list", repo.root)
    assert "alice: 0 live of 1 issued" in listing.text and "cf_" not in listing.output  # never the tokens


def test_sigkill_mid_upload_and_mid_fusion_loses_nothing_acknowledged(repo, tmp_path):
    alice, bob = issue(repo, "alice"), issue(repo, "bob")
    for name, by in (("a", 0.01), ("b", 0.03)):
        save_file(moved(repo, by), tmp_path / f"{name}.safetensors")
    service = Service(repo.root, FAST, env={"COLDFUSION_KILL_AT": "fusion.tensor"})
    try:
        half = (tmp_path / "a.safetensors").read_bytes()
        with socket.create_connection(("127.0.0.1", service.port)) as cut:  # an upload cut off by the kill
            cut.sendall(f"POST /v1/contributors/bob/contributions?base=1&task=t&examples=10 HTTP/1.1\r\n"
                        f"Host: x\r\nAuthorization: Bearer {bob}\r\nContent-Length: {len(half)}\r\n\r\n".encode()
                        + half[: len(half) // 2])
            for who, token in (("a", alice), ("b", bob)):
                reply = invoke("push", service.url, tmp_path / f"{who}.safetensors", "--base", 1, "--task", "t",
                               "--examples", 10, "--token", token)
                assert reply.exit_code == 0, reply.output  # acknowledged
            service.proc.wait(timeout=60)  # the fusion of the two kills the service half-way
        assert service.proc.returncode == -signal.SIGKILL
    finally:
        service.stop()
    assert [c.id for c in Repository(repo.root).contributions() if c.waiting] == [1, 2]
    assert len(Repository(repo.root).versions()) == 1
    with Service(repo.root, FAST) as restarted:  # fuses what was acknowledged
        v2 = wait_for_version(restarted.url, 2)
        assert v2["contributions"] == [1, 2]
    assert not list((repo.root / "service").glob(".incoming-*"))  # the cut-off upload left nothing
    verify = invoke("verify", repo.root)
    assert verify.exit_code == 0 and "ok:" in verify.text, verify.output


def test_serve_refuses_what_is_not_a_repository_or_a_bad_config(tmp_path, repo):
    missing = invoke("serve", tmp_path / "nothing")
    assert missing.exit_code == 2 and "no repository" in missing.text
    (tmp_path / "bad.yaml").write_text(json.dumps({"fusion": {"when_waiting": 0}}))
    bad = invoke("serve", repo.root, "--config", tmp_path / "bad.yaml")
    assert bad.exit_code == 2 and "fusion.when_waiting" in bad.text
    (tmp_path / "op.yaml").write_text(json.dumps({"fusion": {"method": "nonsense"}}))
    op = invoke("serve", repo.root, "--config", tmp_path / "op.yaml")
    assert op.exit_code == 2 and "nonsense" in op.text
    bad_name = invoke("token", "issue", repo.root, "../alice")
    assert bad_name.exit_code == 2 and "cannot name a file" in bad_name.text


def test_the_web_page_shows_lineage_leaderboard_and_contributors_and_updates_live(repo, tmp_path, toy_task_files):
    """The page in headless Chromium (the system's; Playwright's own download is not used)."""
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the dev extra)")
    import shutil

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no system Chromium: apt-get install chromium (make test does where it can)")
    alice, bob = issue(repo, "alice"), issue(repo, "bob")
    suite = {"tasks": [{"name": "sentiment", "path": str(toy_task_files["sentiment"])}], "margin": 5.0,
             "evaluation": {"train_examples": 200, "validation_examples": 60, "test_examples": 100},
             "max_length": 16, "threads": 1, "precision": "fp32"}
    with Service(repo.root, {"fusion": {"when_waiting": 1, "poll_seconds": 0.2, "validation": NO_NORM_BOUND},
                             "suite": suite}) as service:
        def push(token, who, tensors, base):
            save_file(tensors, tmp_path / "up.safetensors")
            return httpx.post(service.url + f"/v1/contributors/{who}/contributions",
                              params={"base": base, "task": "private-task-name", "examples": 10},
                              content=(tmp_path / "up.safetensors").read_bytes(),
                              headers={"Authorization": f"Bearer {token}"})

        assert push(alice, "alice", moved(repo, 1e-4), 1).status_code == 201
        assert push(bob, "bob", {"x": torch.zeros(2)}, 1).status_code == 422  # refused before storing
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            try:
                page = browser.new_page(viewport={"width": 1100, "height": 800})
                page.goto(service.url + "/")
                page.wait_for_selector('#lineage g[data-version="2"][data-status="published"]', timeout=60_000)
                assert page.locator("#lineage g.node").count() == 2
                assert page.locator('#leaderboard tbody tr[data-version="2"] td').nth(2).inner_text() != "–"
                page.wait_for_selector('#contributors tr[data-contributor="bob"]')
                bob_row = page.locator('#contributors tr[data-contributor="bob"]')
                assert bob_row.locator("td").nth(3).inner_text() == "1"  # one refusal
                bob_row.locator("summary").click()
                assert "not the base's architecture" in bob_row.inner_text()
                assert "private-task-name" not in page.content()  # task names stay with their contributors
                # a harmful update arrives while the page is open: held back, drawn without a reload
                zeros = {k: torch.zeros_like(v) if v.is_floating_point() else v
                         for k, v in repo.load_version(2).items()}
                assert push(alice, "alice", zeros, 2).status_code == 201
                page.wait_for_selector('#lineage g[data-version="3"][data-status="held_back"]', timeout=60_000)
                assert "held back" in page.locator('#leaderboard tbody tr[data-version="3"]').inner_text()
                shot = Path(os.environ.get("COLDFUSION_SCREENSHOT_DIR", tmp_path)) / "service_page.png"
                page.screenshot(path=str(shot), full_page=True)
                assert shot.stat().st_size > 10_000
            finally:
                browser.close()


def test_the_export_cache_keeps_only_the_newest_exports_on_disk(repo):
    from coldfusion.service.app import ExportCache

    for by in (0.01, 0.02):
        repo.add_version(moved(repo, by), model_source=repo.version(1).model_source, parent=1)
    cache = ExportCache(repo.root, keep=2)
    listings = {v: cache.files(repo, v) for v in (1, 2, 3)}
    assert sorted(p.name for p in cache.dir.iterdir()) == ["2", "3"]  # each export is a whole model
    def model_files(listing):  # the provenance record and card carry the time of export
        return {k: v for k, v in listing.items() if k not in ("coldfusion_provenance.json", "README.md")}

    assert model_files(cache.files(repo, 1)) == model_files(listings[1])  # written again when asked for
    assert sorted(p.name for p in cache.dir.iterdir()) == ["1", "3"]


def test_encoded_contributions_are_checked_as_the_body_they_stand_for_and_stored_as_sent(repo, tmp_path,
                                                                                        monkeypatch):
    from coldfusion.encodings import EncodingSettings, encode_contribution

    monkeypatch.setenv("COLDFUSION_CACHE", str(tmp_path / "cache"))  # the client keeps the bases it pulled here
    alice, bob = issue(repo, "alice"), issue(repo, "bob")
    save_file(moved(repo, 0.01), tmp_path / "body.safetensors")
    with Service(repo.root, {"fusion": {"when_waiting": 2, "poll_seconds": 0.2}}) as service:
        for encoding, token in (("delta", alice), ("sparse", bob)):  # (one contributor counts once per fusion)
            sent = invoke("push", service.url, tmp_path / "body.safetensors", "--base", 1, "--task", "t",
                          "--examples", 10, "--token", token, "--encoding", encoding, "--density", 0.5)
            assert sent.exit_code == 0, sent.output
        v2 = wait_for_version(service.url, 2)
        assert v2["contributions"] == [1, 2]
        assert service.output().count("GET /v1/versions/1/body") == 1  # the second push encoded against the cache
        stored = Repository(repo.root).contributions()
        assert [c.encoding["kind"] for c in stored] == ["delta", "sparse"]
        assert stored[0].num_bytes < (tmp_path / "body.safetensors").stat().st_size * 0.6  # fp16 delta
        key = "encoder.layer.0.output.dense.bias"  # delta: +0.01; sparse keeps half the entries of +0.01
        fused = Repository(repo.root).load_version(2)[key] - repo.load_version(1)[key]
        assert bool(((fused - 0.01).abs() < 1e-4).logical_or((fused - 0.005).abs() < 1e-4).all())

        url = service.url + "/v1/contributors/alice/contributions"
        headers = {"Authorization": f"Bearer {alice}"}
        bad = encode_contribution(moved(repo, 0.02), repo.load_version(1), EncodingSettings(kind="delta"))
        bad.pop(sorted(bad)[0])  # a delta that leaves a tensor out
        save_file(bad, tmp_path / "bad.safetensors")
        refused = httpx.post(url, params={"base": 1, "task": "t", "examples": 10, "encoding": '{"kind": "delta"}'},
                             content=(tmp_path / "bad.safetensors").read_bytes(), headers=headers)
        assert refused.status_code == 422 and "delta encoding cannot be decoded" in refused.json()["detail"]
        nonsense = httpx.post(url, params={"base": 1, "task": "t", "examples": 10, "encoding": '{"kind": "zip"}'},
                              content=(tmp_path / "body.safetensors").read_bytes(), headers=headers)
        assert nonsense.status_code == 422 and "encoding" in nonsense.json()["detail"]
        assert len(Repository(repo.root).contributions()) == 2  # nothing refused was stored


def test_a_download_that_cannot_be_written_is_a_clear_error_and_leaves_nothing(repo, tmp_path):
    from coldfusion.infra.errors import ColdFusionError
    from coldfusion.service.client import ServiceClient

    with Service(repo.root, FAST) as service:
        client = ServiceClient(service.url)
        nowhere = tmp_path / "no-such-dir" / "body.safetensors"
        with pytest.raises(ColdFusionError, match="could not write the download"):
            client.pull_body("1", nowhere)
        assert not (tmp_path / "no-such-dir").exists()
        client.pull_body("1", tmp_path / "body.safetensors")  # the same call into a real directory works
        assert (tmp_path / "body.safetensors").stat().st_size > 0
        assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]


def test_clients_sharing_a_body_cache_pull_the_same_base_at_once(repo, tmp_path, monkeypatch):
    """Contributor processes on one machine share $COLDFUSION_CACHE: downloads of the same body
    at the same time each land whole (their temporary files do not collide)."""
    import threading

    from coldfusion.io.model_files import sha256_file
    from coldfusion.service.client import ServiceClient

    monkeypatch.setenv("COLDFUSION_CACHE", str(tmp_path / "cache"))
    errors = []

    def pull(i: int) -> None:
        try:
            with ServiceClient(service.url) as client:
                client.pull_body("1", tmp_path / f"base-{i}.safetensors")
        except Exception as exc:  # noqa: BLE001 (collected, asserted below)
            errors.append(exc)

    with Service(repo.root, FAST) as service:
        threads = [threading.Thread(target=pull, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []
    assert {sha256_file(tmp_path / f"base-{i}.safetensors") for i in range(6)} == {repo.version(1).sha256}
    assert [p.name for p in (tmp_path / "cache" / "bodies").iterdir()] == [f"{repo.version(1).sha256}.safetensors"]
