"""The outer optimizer (repository/outer.py): known answers, torch's SGD as the reference,
its buffer kept in the repository with lineage, and a killed run that resumes exactly."""

import pytest
import torch
from test_crash import cli
from test_loop import final_body, tiny_config

from coldfusion.collab import run_cold_fusion
from coldfusion.collab.config import dump_config
from coldfusion.repository import Repository
from coldfusion.repository.outer import OuterSettings, outer_step
from coldfusion.repository.validation import ValidationSettings

DILOCO = OuterSettings(lr=0.7, momentum=0.9, nesterov=True)


def test_lr_1_momentum_0_is_plain_fusion_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(50, 7, generator=g), "ids": torch.arange(5)}
    fused = {"w": torch.randn(50, 7, generator=g), "ids": torch.arange(5)}
    new, buffer = outer_step(base, fused, None, OuterSettings())
    assert OuterSettings().is_plain and buffer is None
    assert torch.equal(new["w"], fused["w"]) and torch.equal(new["ids"], fused["ids"])


def test_two_nesterov_steps_by_hand():
    # g0 = 1 - 0.5 = 0.5; buf = 0.5; step = 0.5 + 0.9 * 0.5 = 0.95; base1 = 1 - 0.7 * 0.95 = 0.335
    base1, buf = outer_step({"w": torch.tensor([1.0])}, {"w": torch.tensor([0.5])}, None, DILOCO)
    assert base1["w"].item() == pytest.approx(0.335) and buf["w"].item() == pytest.approx(0.5)
    # g1 = 0.335 - 0.135 = 0.2; buf = 0.9 * 0.5 + 0.2 = 0.65; step = 0.2 + 0.9 * 0.65 = 0.785;
    # base2 = 0.335 - 0.7 * 0.785 = -0.2145
    base2, buf = outer_step(base1, {"w": torch.tensor([0.135])}, buf, DILOCO)
    assert base2["w"].item() == pytest.approx(-0.2145) and buf["w"].item() == pytest.approx(0.65)
    # without Nesterov the step is the buffer: 0.335 - 0.7 * 0.65
    heavy = OuterSettings(lr=0.7, momentum=0.9)
    _, b1 = outer_step({"w": torch.tensor([1.0])}, {"w": torch.tensor([0.5])}, None, heavy)
    plain2, _ = outer_step(base1, {"w": torch.tensor([0.135])}, b1, heavy)
    assert plain2["w"].item() == pytest.approx(0.335 - 0.7 * 0.65)


@pytest.mark.parametrize("settings", [DILOCO, OuterSettings(lr=0.5, momentum=0.6), OuterSettings(lr=1.3)])
def test_matches_torch_sgd_on_the_pseudo_gradient(settings):
    g = torch.Generator().manual_seed(1)
    param = torch.nn.Parameter(torch.randn(30, generator=g))
    sgd = torch.optim.SGD([param], lr=settings.lr, momentum=settings.momentum, nesterov=settings.nesterov)
    base, buffer = {"w": param.detach().clone()}, None
    for _ in range(4):
        fused = {"w": base["w"] + 0.3 * torch.randn(30, generator=g)}
        param.grad = (param.detach() - fused["w"]).clone()
        sgd.step()
        base, buffer = outer_step(base, fused, buffer, settings)
        assert torch.allclose(base["w"], param.detach(), atol=1e-6)


def test_bf16_bodies_step_in_fp32_and_keep_their_dtype():
    base = {"w": torch.full((4,), 1.0, dtype=torch.bfloat16)}
    new, buffer = outer_step(base, {"w": torch.full((4,), 0.5, dtype=torch.bfloat16)}, None, DILOCO)
    assert new["w"].dtype == torch.bfloat16 and buffer["w"].dtype == torch.float32
    assert new["w"][0].item() == pytest.approx(0.335, abs=4e-3)


def test_nesterov_without_momentum_is_refused():
    with pytest.raises(ValueError, match="nesterov needs a momentum above 0"):
        OuterSettings(nesterov=True)


def _body(value: float) -> dict:
    return {"w": torch.full((3, 2), value), "b": torch.full((2,), value)}


LARGE = ValidationSettings(base_norm_factor=None)  # round numbers: updates of half the base's size, on purpose


def test_the_repository_keeps_the_buffer_with_the_version_it_made(tmp_path):
    repo = Repository(tmp_path / "repo")
    v0 = repo.add_version(_body(1.0), model_source="test")

    def fuse_onto(version, values, outer, who="c"):
        ids = [repo.add_contribution(_body(x), base_version=version.id, contributor=f"{who}{i}", task=f"t{i}",
                                     num_examples=10, rules=LARGE).id for i, x in enumerate(values)]
        return repo.fuse(version.id, ids, outer=outer)

    v1 = fuse_onto(v0, [0.4, 0.6], DILOCO)  # fused 0.5: base 0.335 as by hand
    assert torch.allclose(repo.load(v1.sha256)["w"], torch.tensor(0.335))
    record = v1.fusion["outer"]
    assert record["momentum_from"] is None and record["lr"] == 0.7 and record["nesterov"] is True
    assert torch.allclose(repo.load(record["momentum_buffer"])["w"], torch.tensor(0.5))
    v2 = fuse_onto(v1, [0.035, 0.235], DILOCO)  # fused 0.135: the buffer of v1 continues
    assert v2.fusion["outer"]["momentum_from"] == v1.id
    assert torch.allclose(repo.load(v2.sha256)["w"], torch.tensor(-0.2145))
    report = repo.verify(clean=True)
    assert report.ok and not report.unreferenced, report.problems
    assert repo.path_of(record["momentum_buffer"]).exists()  # --clean keeps the buffers
    # plain settings store what no outer optimizer stores
    plain = fuse_onto(v0, [0.2, 0.3], OuterSettings())
    other = Repository(tmp_path / "other")  # a payload is admitted once: the same inputs again need another one
    root = other.add_version(_body(1.0), model_source="test")
    ids = [other.add_contribution(_body(x), base_version=root.id, contributor=f"c{i}", task=f"t{i}", num_examples=10,
                                  rules=LARGE).id for i, x in enumerate([0.2, 0.3])]
    none = other.fuse(root.id, ids, outer=None)
    assert plain.sha256 == none.sha256 and "outer" not in plain.fusion


def test_a_killed_run_with_an_outer_optimizer_resumes_exactly(tiny_model_dir, toy_task_files, tmp_path):
    def config(root):
        cfg = tiny_config(tiny_model_dir, toy_task_files, root)
        return cfg.model_copy(update={"fusion": cfg.fusion.model_copy(update={"outer": DILOCO})})

    reference = final_body(run_cold_fusion(config(tmp_path / "reference")))
    plain = final_body(run_cold_fusion(tiny_config(tiny_model_dir, toy_task_files, tmp_path / "plain")))
    assert not all(torch.equal(reference[k], plain[k]) for k in reference)  # the outer step changed the run

    path = tmp_path / "run.yaml"
    path.write_text(dump_config(config(tmp_path)))
    killed = cli("run", path, kill_at="training.step:15")  # iteration 2: needs iteration 1's buffer
    assert killed.returncode == -9, killed.stderr[-1500:]
    resumed = cli("run", path, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    body = final_body(tmp_path / "runs" / "tiny")
    assert all(torch.equal(body[k], reference[k]) for k in reference)
    repo = Repository(tmp_path / "runs" / "tiny" / "repository")
    last = repo.version(repo.latest().id)
    assert last.fusion["outer"]["momentum_from"] == last.parent
    assert repo.verify().ok


def test_fuse_through_the_cli_with_an_outer_optimizer(tmp_path):
    from test_uploads import invoke

    repo = Repository(tmp_path / "repo")
    v0 = repo.add_version(_body(1.0), model_source="test")
    repo.add_contribution(_body(0.5), base_version=v0.id, contributor="a", task="t", num_examples=1, rules=LARGE)
    refused = invoke("fuse", repo.root, "--nesterov")
    assert refused.exit_code == 2 and "nesterov needs a momentum above 0" in refused.text
    first = invoke("fuse", repo.root, "--outer-lr", 0.7, "--outer-momentum", 0.9, "--nesterov")
    assert first.exit_code == 0 and "outer step: lr 0.7, momentum 0.9 (Nesterov), a new buffer" in first.text
    repo.add_contribution(_body(0.135), base_version=2, contributor="a", task="t", num_examples=1, rules=LARGE)
    second = invoke("fuse", repo.root, "--outer-lr", 0.7, "--outer-momentum", 0.9, "--nesterov")
    assert second.exit_code == 0 and "continuing the buffer of version 2" in second.text, second.text
    assert torch.allclose(repo.load_version(3)["w"], torch.tensor(-0.2145))


@pytest.mark.parametrize(("outer", "message"), [
    ({"momentum": 1.5}, r"fusion\.outer\.momentum"),
    ({"lr": 0}, r"fusion\.outer\.lr"),
    ({"nesterov": True}, "nesterov needs a momentum above 0"),
    ({"lr": 0.7, "beta": 0.9}, r"fusion\.outer\.beta"),
])
def test_bad_outer_settings_in_a_run_config_are_refused_by_key(outer, message):
    from coldfusion.collab.config import parse_config
    from coldfusion.infra.errors import ColdFusionError

    with pytest.raises(ColdFusionError, match=message):
        parse_config({"tasks": ["movie_sentiment"], "fusion": {"outer": outer}}, "run.yaml")
