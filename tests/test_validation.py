"""The operator's rules: the inspection of a body against its base, the norm bounds, and what
the fusion itself still decides (one contribution per contributor, staleness). Admission
through every door is tests/test_intake.py."""

import math
import re

import pytest
import torch

from coldfusion.infra.errors import ColdFusionError
from coldfusion.io.checkpoint import save_tensors
from coldfusion.io.tensorfile import SafetensorsReader
from coldfusion.repository import Repository, intake
from coldfusion.repository.intake import Refused
from coldfusion.repository.validation import ValidationSettings, inspect_contribution, norm_problem


def body(value: float) -> dict[str, torch.Tensor]:
    return {"layer.weight": torch.full((3, 2), value), "layer.bias": torch.full((3,), value),
            "position_ids": torch.arange(4)}


def inspect(tmp_path, tensors, base=None):
    save_tensors(tmp_path / "c.safetensors", tensors)
    save_tensors(tmp_path / "b.safetensors", base or body(0.0))
    with SafetensorsReader([tmp_path / "c.safetensors"]) as c, SafetensorsReader([tmp_path / "b.safetensors"]) as b:
        return inspect_contribution(c, b)


def test_a_clean_contribution_passes_with_its_delta_norm(tmp_path):
    found = inspect(tmp_path, body(0.5))
    assert found.problem is None
    assert found.delta_norm == pytest.approx(math.sqrt(9 * 0.25))  # 9 float entries moved by 0.5


@pytest.mark.parametrize("fault, reason", [
    (lambda t: t["layer.weight"].__setitem__((0, 1), float("nan")), "'layer.weight' has 1 non-finite"),
    (lambda t: t["layer.bias"].__setitem__(2, float("inf")), "'layer.bias' has 1 non-finite"),
    (lambda t: t.__setitem__("layer.weight", torch.zeros(2, 3)), r"'layer.weight' is float32 \[2, 3\], the base's "
                                                                 r"is float32 \[3, 2\]"),
    (lambda t: t.__setitem__("layer.bias", torch.zeros(3, dtype=torch.float16)), "'layer.bias' is float16"),
    (lambda t: t.pop("layer.bias"), r"1 missing tensors \['layer.bias'\]"),
    (lambda t: t.__setitem__("extra", torch.zeros(1)), r"1 unexpected tensors \['extra'\]"),
    (lambda t: t.__setitem__("position_ids", torch.arange(4).flip(0)), "integer tensor 'position_ids' differs"),
])
def test_each_fault_is_named(tmp_path, fault, reason):
    tensors = body(0.1)
    fault(tensors)
    found = inspect(tmp_path, tensors)
    assert found.problem is not None and re.search(reason, found.problem), found.problem


def test_norm_problem_known_answers():
    settings = ValidationSettings(outlier_factor=5, base_norm_factor=0.5)
    assert norm_problem(1.0, [], 100.0, settings) is None
    assert "no-op" in norm_problem(0.0, [], 100.0, settings)
    cold = norm_problem(60.0, [], 100.0, settings)  # no history: only the base's own norm bounds it
    assert "0.6x the base's own norm (100)" in cold and "base_norm_factor = 0.5" in cold
    assert norm_problem(60.0, [], 0.0, settings) is None  # a base of zeros has no scale to be relative to
    assert norm_problem(40.0, [1.0, 1.5], 100.0, settings) is None  # two admitted: no median yet
    flagged = norm_problem(40.0, [1.0, 1.5, 2.0], 100.0, settings)
    assert "26.7x the median of the 3 contributions admitted before it (1.5)" in flagged
    assert norm_problem(7.0, [1.0, 1.5, 2.0], 100.0, settings) is None  # within 5x
    assert norm_problem(40.0, [1.0] * 3 + [100.0] * 30, 100.0, ValidationSettings(norm_history=3)) is not None
    assert norm_problem(40.0, [1.0, 1.5, 2.0], 100.0, ValidationSettings(outlier_factor=None)) is None
    assert "exceeds max_delta_norm 2" in norm_problem(3.0, [], 100.0, ValidationSettings(max_delta_norm=2.0))
    assert norm_problem(60.0, [], 100.0, ValidationSettings(base_norm_factor=None)) is None


def contribute(repo, base, tensors, name, examples=10):
    return repo.add_contribution(tensors, base_version=base.id, contributor=name, task=name, num_examples=examples)


def test_faulty_contributions_are_refused_at_admission_recorded_and_the_rest_fused(tmp_path):
    repo = Repository(tmp_path)
    base = repo.add_version(body(0.0), model_source="m")
    good = [contribute(repo, base, body(v), f"good{v}") for v in (1.0, 2.0, 3.0)]
    nan = body(1.0)
    nan["layer.bias"][0] = float("nan")
    shaped = body(1.0)
    shaped["layer.weight"] = torch.zeros(6)
    for tensors, name, rule in [(nan, "nan", "finite"), (shaped, "shape", "architecture"),
                                (body(100.0), "scaled", "norm")]:
        with pytest.raises(Refused, match=rf"refused \({rule}\)") as refused:
            contribute(repo, base, tensors, name)
        assert refused.value.rule == rule
    reasons = {r.contributor: (r.rule, r.reason) for r in repo.refusals()}
    assert "non-finite" in reasons["nan"][1] and "the base's is float32 [3, 2]" in reasons["shape"][1]
    assert "the median of the 3 contributions admitted before it" in reasons["scaled"][1]
    assert [c.id for c in repo.contributions()] == [c.id for c in good]  # nothing refused was stored
    v = repo.fuse(base.id, [c.id for c in good], method="average")
    assert v.fusion["contributions"] == [c.id for c in good] and "rejected" not in v.fusion
    assert torch.allclose(repo.load_version(v.id)["layer.bias"], torch.full((3,), 2.0))
    assert v.fusion["delta_norms"][str(good[0].id)] == pytest.approx(3.0)  # 9 entries moved by 1
    assert all(c.fused_into == v.id and c.delta_norm > 0 for c in repo.contributions(base_version=base.id))


def test_too_few_contributions_left_fuse_nothing_and_say_why(tmp_path):
    repo = Repository(tmp_path)
    v1 = repo.add_version(body(0.0), model_source="m")
    stale = contribute(repo, v1, body(1.0), "a")
    v2 = repo.add_version(body(10.0), model_source="m", parent=v1.id)
    ids = [stale.id, contribute(repo, v2, body(11.0), "b").id]
    with pytest.raises(ColdFusionError, match=r"only 1 of 2 contributions passed validation, fewer than "
                                              r"min_accepted = 2: contribution 1: stale: trained from version 1"):
        repo.fuse(v2.id, ids, validation=ValidationSettings(min_accepted=2, stale="reject"))
    assert len(repo.versions()) == 2
    assert repo.contributions(base_version=v1.id)[0].rejected.startswith("stale: trained from version 1")


def test_a_contributor_counts_once_per_fusion_with_its_newest_contribution(tmp_path):
    repo = Repository(tmp_path)
    base = repo.add_version(body(0.0), model_source="m")
    alice = [contribute(repo, base, body(v), "alice") for v in (1.0, 1.001, 1.002)]  # near-identical copies
    bob = contribute(repo, base, body(3.0), "bob")
    v = repo.fuse(base.id, [c.id for c in [*alice, bob]], method="average")
    assert v.fusion["contributions"] == [alice[-1].id, bob.id]
    assert torch.allclose(repo.load_version(v.id)["layer.weight"], torch.full((3, 2), (1.002 + 3.0) / 2))
    assert all(v.fusion["rejected"][str(c.id)].startswith(f"superseded: alice counts once per fusion, with its "
                                                          f"newest contribution {alice[-1].id}") for c in alice[:2])


def test_corrupt_contribution_file_is_refused_and_a_corrupt_base_stops_fusion(tmp_path):
    repo = Repository(tmp_path)
    base = repo.add_version(body(0.0), model_source="m")
    a, b = contribute(repo, base, body(1.0), "a"), contribute(repo, base, body(3.0), "b")
    c = contribute(repo, base, body(2.0), "c")
    path = repo.path_of(b.sha256)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # one bit of one value
    path.write_bytes(bytes(data))
    v = repo.fuse(base.id, [a.id, b.id])
    assert v.fusion["contributions"] == [a.id]
    assert "does not match its checksum" in v.fusion["rejected"][str(b.id)]
    base_path = repo.path_of(base.sha256)
    base_path.write_bytes(base_path.read_bytes()[:-4])
    with pytest.raises(ColdFusionError, match="base version 1 .* does not match its checksum"):
        repo.fuse(base.id, [c.id])
    intake._BASES.clear()  # (admission keeps the bases it read in memory; a fresh process reads this one again)
    with pytest.raises(ColdFusionError, match="checksum mismatch .* the file is corrupt") as damaged:
        contribute(repo, base, body(4.0), "d")  # admission reads the base too: damage is not the sender's fault
    assert not isinstance(damaged.value, Refused)


def test_stale_contribution_is_rebased_onto_the_current_base(tmp_path):
    repo = Repository(tmp_path)
    v1 = repo.add_version(body(0.0), model_source="m")
    stale = contribute(repo, v1, body(1.0), "late")  # moved +1 from v1
    v2 = repo.add_version(body(10.0), model_source="m", parent=v1.id)
    fresh = contribute(repo, v2, body(13.0), "fresh")  # moved +3 from v2
    v3 = repo.fuse(v2.id, [stale.id, fresh.id], method="average")
    assert torch.allclose(repo.load_version(v3.id)["layer.weight"], torch.full((3, 2), 12.0))  # 10 + (1 + 3) / 2
    moved = v3.fusion["rebased"][str(stale.id)]
    assert moved["from_version"] == v1.id
    assert torch.allclose(repo.load(moved["sha256"])["layer.bias"], torch.full((3,), 11.0))
    assert torch.equal(repo.load(moved["sha256"])["position_ids"], torch.arange(4))
    assert v3.fusion["delta_norms"][str(stale.id)] == pytest.approx(3.0)  # measured against its own base


def test_stale_contribution_is_refused_by_policy(tmp_path):
    repo = Repository(tmp_path)
    v1 = repo.add_version(body(0.0), model_source="m")
    stale = contribute(repo, v1, body(1.0), "late")
    v2 = repo.add_version(body(10.0), model_source="m", parent=v1.id)
    fresh = contribute(repo, v2, body(13.0), "fresh")
    v3 = repo.fuse(v2.id, [stale.id, fresh.id], validation=ValidationSettings(stale="reject"))
    assert v3.fusion["contributions"] == [fresh.id]
    assert v3.fusion["rejected"] == {str(stale.id): "stale: trained from version 1, not the current base 2 "
                                                    "(validation.stale = reject)"}


def test_staleness_bound_refuses_bases_too_far_behind_or_off_the_lineage(tmp_path):
    repo = Repository(tmp_path)
    v1 = repo.add_version(body(0.0), model_source="m")
    v2 = repo.add_version(body(10.0), model_source="m", parent=v1.id)
    side = repo.add_version(body(5.0), model_source="m", parent=v1.id)  # a sibling of v2: not an ancestor of v3
    v3 = repo.add_version(body(20.0), model_source="m", parent=v2.id)
    two_behind, one_behind = contribute(repo, v1, body(1.0), "a"), contribute(repo, v2, body(11.0), "b")
    off, fresh = contribute(repo, side, body(6.0), "c"), contribute(repo, v3, body(21.0), "d")
    v4 = repo.fuse(v3.id, [two_behind.id, one_behind.id, off.id, fresh.id],
                   validation=ValidationSettings(max_staleness=1, outlier_factor=None))
    assert v4.fusion["contributions"] == [one_behind.id, fresh.id]
    assert v4.fusion["rejected"] == {
        str(two_behind.id): "stale: trained from version 1, 2 versions behind the current base 4 "
                            "(validation.max_staleness = 1)",
        str(off.id): "stale: trained from version 3, not an ancestor of the current base 4 "
                     "(validation.max_staleness = 1)"}
    assert v4.fusion["staleness"] == {str(one_behind.id): 1, str(fresh.id): 0}


def test_staleness_weight_is_the_fedasync_polynomial_on_top_of_the_operators_weights(tmp_path):
    repo = Repository(tmp_path)
    v1 = repo.add_version(body(0.0), model_source="m")
    v2 = repo.add_version(body(10.0), model_source="m", parent=v1.id)
    v3 = repo.add_version(body(20.0), model_source="m", parent=v2.id)
    old = contribute(repo, v1, body(0.6), "old")  # +0.6 from v1: 2 versions behind, weight (1 + 2)^-1 = 1/3
    new = contribute(repo, v3, body(20.3), "new")  # +0.3 from v3: weight 1
    v4 = repo.fuse(v3.id, [old.id, new.id], validation=ValidationSettings(staleness_exponent=1.0))
    expected = 20.0 + (0.6 / 3 + 0.3) / (1 / 3 + 1)  # 20.375
    assert torch.allclose(repo.load_version(v4.id)["layer.weight"], torch.full((3, 2), expected))
    assert v4.fusion["weights"] == {str(old.id): pytest.approx(1 / 3, abs=1e-6), str(new.id): 1.0}
    # weighted fusion: the example counts times the staleness weight (new payloads: a copy is not admitted twice)
    again = [contribute(repo, v1, body(0.9), "old2", examples=300), contribute(repo, v3, body(20.6), "new2",
                                                                             examples=100)]
    v5 = repo.fuse(v3.id, [c.id for c in again], method="weighted",
                   validation=ValidationSettings(staleness_exponent=1.0))
    assert v5.fusion["weights"] == {str(again[0].id): pytest.approx(100.0), str(again[1].id): pytest.approx(100.0)}
    assert torch.allclose(repo.load_version(v5.id)["layer.weight"], torch.full((3, 2), 20.0 + (0.9 + 0.6) / 2))
    plain = [contribute(repo, v1, body(0.8), "old3"), contribute(repo, v3, body(20.4), "new3")]
    v6 = repo.fuse(v3.id, [c.id for c in plain])  # exponent 0: stale contributions weigh as much as fresh ones
    assert "weights" not in v6.fusion
    assert torch.allclose(repo.load_version(v6.id)["layer.weight"], torch.full((3, 2), 20.0 + (0.8 + 0.4) / 2))


def test_a_contributor_counts_with_its_newest_contribution_that_the_staleness_rules_let_through(tmp_path):
    repo = Repository(tmp_path)
    v1 = repo.add_version(body(0.0), model_source="m")
    v2 = repo.add_version(body(10.0), model_source="m", parent=v1.id)
    fresh = contribute(repo, v2, body(11.0), "alice")
    late = contribute(repo, v1, body(1.0), "alice")  # newer, but trained from an older base
    v3 = repo.fuse(v2.id, [fresh.id, late.id], validation=ValidationSettings(stale="reject"))
    assert v3.fusion["contributions"] == [fresh.id]
    assert v3.fusion["rejected"][str(late.id)].startswith("stale: trained from version 1")
