"""Contribution encodings: round trips within their stated tolerance, the entries sparse
keeps, LoRA fused as products B A, and every encoding through the loop with its bytes."""

import json

import pytest
import torch
from test_loop import tiny_config

from coldfusion.collab import run_cold_fusion
from coldfusion.collab.config import parse_config
from coldfusion.encodings import EncodingSettings, decode_contribution, encode_contribution, payload_bytes
from coldfusion.encodings.lora import fold_lora
from coldfusion.encodings.sparse import encode_sparse
from coldfusion.infra.errors import ColdFusionError
from coldfusion.repository import Repository
from coldfusion.repository.intake import Refused
from coldfusion.repository.validation import ValidationSettings


def pair(seed=0):
    """A base and a finetuned body: small deltas on float tensors, an integer buffer unchanged."""
    g = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(16, 8, generator=g), "b": torch.randn(16, generator=g),
            "ids": torch.arange(5)}
    body = {"w": base["w"] + 0.01 * torch.randn(16, 8, generator=g),
            "b": base["b"] + 0.01 * torch.randn(16, generator=g), "ids": torch.arange(5)}
    return base, body


@pytest.mark.parametrize("dtype, tolerance", [("float32", 1e-6), ("float16", 1e-3), ("bfloat16", 1e-2)])
def test_delta_round_trip(dtype, tolerance):
    base, body = pair()
    s = EncodingSettings(kind="delta", dtype=dtype)
    payload = encode_contribution(body, base, s)
    assert set(payload) == {"w", "b"} and payload["w"].dtype == getattr(torch, dtype)
    decoded = decode_contribution(payload, s.record(), base)
    assert torch.equal(decoded["ids"], base["ids"])
    for k in ("w", "b"):
        delta = body[k] - base[k]
        assert (decoded[k] - body[k]).abs().max() <= tolerance * delta.abs().max() + 1e-6  # relative to the update


def test_sparse_with_density_one_is_exact_and_lower_densities_keep_the_largest_deltas():
    base, body = pair()
    full = EncodingSettings(kind="sparse", density=1.0, dtype="float32")
    decoded = decode_contribution(encode_contribution(body, base, full), full.record(), base)
    assert all(torch.allclose(decoded[k], body[k], atol=1e-7) for k in ("w", "b"))
    s = EncodingSettings(kind="sparse", density=0.1, dtype="float32")
    payload = encode_contribution(body, base, s)
    deltas = torch.cat([(body[k] - base[k]).flatten() for k in ("b", "w")])  # the order entries are ranked in
    kept = sum(payload[k].numel() for k in payload if k.endswith(".indices"))
    assert kept == round(0.1 * deltas.numel())
    decoded = decode_contribution(payload, s.record(), base)
    changed = torch.cat([(decoded[k] - base[k]).flatten() for k in ("b", "w")])
    threshold = deltas.abs().sort(descending=True).values[kept - 1]
    assert torch.equal(changed != 0, deltas.abs() >= threshold)  # exactly the largest, sent exactly
    assert torch.allclose(changed[changed != 0], deltas[changed != 0], atol=1e-7)


def test_sparse_is_chosen_over_the_whole_body_and_by_fisher_when_asked():
    base = {"big": torch.zeros(10), "small": torch.zeros(10)}
    body = {"big": torch.arange(1.0, 11.0), "small": torch.full((10,), 1e-3)}
    by_magnitude = encode_sparse(body, base, density=0.25, dtype="float32")
    assert "small.indices" not in by_magnitude and sorted(by_magnitude["big.indices"].tolist()) == [5, 6, 7, 8, 9]
    fisher = {"big": torch.zeros(10), "small": torch.arange(10.0)}
    by_fisher = encode_sparse(body, base, density=0.25, dtype="float32", scores=fisher)
    assert "big.indices" not in by_fisher and sorted(by_fisher["small.indices"].tolist()) == [5, 6, 7, 8, 9]
    with pytest.raises(ColdFusionError, match="needs the contributor's Fisher"):
        encode_contribution(body, base, EncodingSettings(kind="sparse", score="fisher"))


@pytest.mark.parametrize("payload, message", [
    ({"w.indices": torch.tensor([200], dtype=torch.int32), "w.values": torch.ones(1)}, "outside"),
    ({"w.indices": torch.tensor([1, 1], dtype=torch.int32), "w.values": torch.ones(2)}, "repeated"),
    ({"w.indices": torch.tensor([1], dtype=torch.int32)}, "unpaired"),
    ({"nope.indices": torch.tensor([1], dtype=torch.int32), "nope.values": torch.ones(1)}, "no float tensor"),
    ({"w.indices": torch.tensor([1.0]), "w.values": torch.ones(1)}, "1-d integers"),
])
def test_sparse_payloads_that_cannot_be_decoded_say_why(payload, message):
    base, _ = pair()
    with pytest.raises(ColdFusionError, match=message):
        decode_contribution(payload, {"kind": "sparse"}, base)


def lora_payload(seed, rank=2):
    g = torch.Generator().manual_seed(seed)
    return {"w.lora_A": torch.randn(rank, 8, generator=g), "w.lora_B": torch.randn(16, rank, generator=g)}


def test_lora_folds_to_w_plus_scaled_b_a_and_checks_shapes():
    base, _ = pair()
    p = lora_payload(1)
    folded = fold_lora(p, base, alpha=4.0, r=2)
    assert torch.allclose(folded["w"], base["w"] + 2.0 * p["w.lora_B"] @ p["w.lora_A"], atol=1e-6)
    assert torch.equal(folded["b"], base["b"])
    with pytest.raises(ColdFusionError, match="rank"):
        fold_lora(p, base, alpha=4.0, r=3)
    with pytest.raises(ColdFusionError, match="not a weight matrix"):
        fold_lora({"b.lora_A": torch.ones(2, 16), "b.lora_B": torch.ones(16, 2)}, base, alpha=1.0, r=2)


def test_lora_contributions_are_fused_as_products_not_as_factors(tmp_path):
    """Two contributions of LoRA factors, averaged by the repository: the result is the dense
    computation base + mean_i(s B_i A_i), not base + s mean(B) mean(A)."""
    base, _ = pair()
    repo = Repository(tmp_path / "r")
    v = repo.add_version(base, model_source="x")
    encoding = {"kind": "lora", "r": 2, "alpha": 4.0, "dtype": "float32"}
    payloads = [lora_payload(1), lora_payload(2)]
    ids = [repo.add_contribution(p, base_version=v.id, contributor=f"c{i}", task=f"t{i}", num_examples=10,
                                 encoding=encoding, rules=ValidationSettings(base_norm_factor=None)).id
           for i, p in enumerate(payloads)]  # (random factors: updates larger than the base, on purpose)
    fused = repo.load_version(repo.fuse(v.id, ids, method="average").id)
    products = [p["w.lora_B"] @ p["w.lora_A"] for p in payloads]
    dense = base["w"] + 2.0 * (products[0] + products[1]) / 2
    factors = base["w"] + 2.0 * ((payloads[0]["w.lora_B"] + payloads[1]["w.lora_B"]) / 2) @ (
        (payloads[0]["w.lora_A"] + payloads[1]["w.lora_A"]) / 2)
    assert torch.allclose(fused["w"], dense, atol=1e-5)
    assert (fused["w"] - factors).abs().max() > 0.1
    assert repo.contributions()[0].encoding == encoding
    assert repo.contributions()[0].num_bytes < repo.checkpoint_bytes(v.sha256)


def test_an_undecodable_contribution_is_refused_at_admission_and_the_rest_fused(tmp_path):
    base, body = pair()
    repo = Repository(tmp_path / "r")
    v = repo.add_version(base, model_source="x")
    s = EncodingSettings(kind="delta", dtype="float32")
    good = repo.add_contribution(encode_contribution(body, base, s), base_version=v.id, contributor="a", task="a",
                                 num_examples=1, encoding=s.record())
    with pytest.raises(Refused, match=r"refused \(encoding\): against version 1: its sparse encoding cannot be"):
        repo.add_contribution({"w.indices": torch.tensor([999], dtype=torch.int32), "w.values": torch.ones(1)},
                              base_version=v.id, contributor="b", task="b", num_examples=1, encoding={"kind": "sparse"})
    version = repo.fuse(v.id, [good.id])
    assert version.fusion["contributions"] == [good.id]
    assert torch.allclose(repo.load_version(version.id)["w"], body["w"], atol=1e-6)
    report = repo.verify()
    assert report.ok and not report.temporary  # the decoded scratch files are gone


def encoded_config(tiny_model_dir, toy_task_files, tmp_path, name, **extra):
    """The loop tests' tiny run, one iteration, with `extra` settings (validated)."""
    config = tiny_config(tiny_model_dir, toy_task_files, tmp_path, iterations=1).model_dump(mode="json")
    return parse_config({**config, "name": name, **extra})


def test_every_encoding_runs_the_loop_and_reports_its_bytes(tiny_model_dir, toy_task_files, tmp_path):
    sent = {}
    for kind, extra in [("full", {}), ("delta", {}), ("sparse", {"density": 0.05}),
                        ("lora", {"lora": {"r": 2, "target_modules": ["query", "value"]}})]:
        run_dir = run_cold_fusion(encoded_config(tiny_model_dir, toy_task_files, tmp_path, kind,
                                                 contribution={"kind": kind, **extra}))
        rows = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
        (fusion,) = [r for r in rows if r["kind"] == "fusion"]
        contributions = [r for r in rows if r["kind"] == "contribution"]
        assert fusion["encoding"] == kind and all(r["encoding"] == kind for r in contributions)
        assert fusion["bytes_sent"] == sum(r["bytes_sent"] for r in contributions) > 0
        assert fusion["bytes_stored"] > fusion["bytes_sent"]
        assert f"| 1 | {kind} | 2 | {fusion['bytes_sent'] / 1e6:.2f} |" in (run_dir / "summary.md").read_text()
        repo = Repository(run_dir / "repository")
        assert {c.encoding["kind"] for c in repo.contributions()} == {kind}
        assert repo.verify().ok and len(repo.versions()) == 2
        sent[kind] = fusion["bytes_sent"]
    assert sent["lora"] < sent["sparse"] < sent["delta"] < sent["full"]
    assert sent["delta"] == pytest.approx(sent["full"] / 2, rel=0.1)  # half the data; the same header


def test_lora_training_sends_only_factors_that_decode_to_the_trained_body(tiny_model_dir, toy_task_files):
    from coldfusion.contributors.contributor import Contributor
    from coldfusion.models.encoder import Encoder
    from coldfusion.tasks import TaskSpec, load_task
    from coldfusion.training import FinetuneSettings

    encoder = Encoder.load(str(tiny_model_dir))
    task = load_task(TaskSpec(name="sentiment", path=toy_task_files["sentiment"]))
    s = EncodingSettings(kind="lora", dtype="float32", lora={"r": 2, "target_modules": ["query", "value"]})
    contributor = Contributor(task, encoder, finetune_settings=FinetuneSettings(batch_size=16), max_length=32,
                              pooling="mean", examples_per_iteration=64, validation_examples=30, keep_head=False,
                              seed=0, statistics="fisher", encoding=s)
    result = contributor.contribute(encoder.pretrained, iteration=0)
    assert set(result.body) == {f"encoder.layer.{i}.attention.self.{m}.weight.lora_{f}"
                                for i in (0, 1) for m in ("query", "value") for f in "AB"}
    assert payload_bytes(result.body) < payload_bytes(encoder.pretrained) / 10
    decoded = decode_contribution(result.body, result.encoding, encoder.pretrained)
    changed = {k for k in decoded if not torch.equal(decoded[k], encoder.pretrained[k])}
    assert changed and all(".query." in k or ".value." in k for k in changed)  # only adapted weights move
    assert set(result.stats["fisher"]) == set(encoder.pretrained)  # statistics of the folded body
    again = Contributor(task, encoder, finetune_settings=FinetuneSettings(batch_size=16), max_length=32,
                        pooling="mean", examples_per_iteration=64, validation_examples=30, keep_head=False,
                        seed=0, encoding=s).contribute(encoder.pretrained, iteration=0)
    assert all(torch.equal(result.body[k], again.body[k]) for k in result.body)  # seeded: reproducible


def test_config_refuses_an_attack_on_encoded_contributions(tiny_model_dir, toy_task_files, tmp_path):
    with pytest.raises(ColdFusionError, match="full bodies"):
        encoded_config(tiny_model_dir, toy_task_files, tmp_path, "x", contribution={"kind": "delta"},
                       attack={"contributors": ["sentiment"]})
    with pytest.raises(ColdFusionError, match="contribution"):
        encoded_config(tiny_model_dir, toy_task_files, tmp_path, "x", contribution={"kind": "zip"})


def test_every_fusion_operator_fuses_every_encoding_as_it_fuses_the_decoded_bodies(tmp_path):
    """The repository decodes before it fuses: for each operator (with the statistics it
    needs) and each encoding, the fused base equals fusing the decoded bodies directly."""
    from coldfusion.fusion import REGISTRY, fuse_files
    from coldfusion.io.checkpoint import save_tensors
    from coldfusion.repository.validation import ValidationSettings

    def save(path, tensors):
        save_tensors(path, tensors)
        return path

    everyone = ValidationSettings(outlier_factor=None)  # three similar updates: nothing to refuse here

    base, _ = pair(0)
    bodies = [pair(seed)[1] for seed in (1, 2, 3)]
    bodies = [{k: (base[k] + (v - pair(seed)[0][k]) if v.is_floating_point() else v) for k, v in b.items()}
              for seed, b in zip((1, 2, 3), bodies, strict=True)]  # three updates of the same base
    stats = {"fisher": [{k: torch.rand_like(v) + 0.1 for k, v in base.items() if v.is_floating_point()}
                        for _ in bodies],
             "gram": [{"w": (lambda x: x.T @ x)(torch.randn(20, 8))} for _ in bodies]}
    encodings = {kind: (s.record(), [encode_contribution(b, base, s) for b in bodies]) for kind, s in (
        ("delta", EncodingSettings(kind="delta", dtype="float16")),
        ("sparse", EncodingSettings(kind="sparse", density=0.3, dtype="float32")))}
    encodings["lora"] = ({"kind": "lora", "r": 2, "alpha": 0.1}, [lora_payload(seed) for seed in (1, 2, 3)])
    for kind, (record, payloads) in encodings.items():
        decoded = [decode_contribution(p, record, base) for p in payloads]
        for method, op in REGISTRY.items():
            repo = Repository(tmp_path / f"{kind}-{method}")
            v = repo.add_version(base, model_source="x")
            ids = [repo.add_contribution(p, base_version=v.id, contributor=f"c{i}", task=f"t{i}", num_examples=i + 1,
                                         encoding=record,
                                         stats={op.needs_stats: stats[op.needs_stats][i]} if op.needs_stats else None
                                         ).id for i, p in enumerate(payloads)]
            fused = repo.load_version(repo.fuse(v.id, ids, method=method, validation=everyone).id)
            paths = [save(tmp_path / f"{kind}-{method}-{i}.safetensors", d) for i, d in enumerate(decoded)]
            stat_paths = [save(tmp_path / f"{kind}-{method}-{i}.stats.safetensors", st)
                          for i, st in enumerate(stats[op.needs_stats])] if op.needs_stats else None
            expected = fuse_files(paths, method, [1, 2, 3] if op.weighting == "examples" else None,
                                  base=repo.path_of(v.sha256), stats=stat_paths)
            for k in expected:
                assert torch.allclose(fused[k].float(), expected[k].float(), atol=1e-5), (kind, method, k)


def test_a_fish_mask_restricts_training_to_its_entries():
    from coldfusion.encodings.sparse import restrict_training, top_share

    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 4)
    before = {k: v.detach().clone() for k, v in layer.state_dict().items()}
    scores = {"weight": torch.arange(24.0).view(4, 6), "bias": torch.zeros(4)}
    chosen = top_share(scores, density=4 / 28)
    assert chosen["weight"].tolist() == [20, 21, 22, 23] and chosen["bias"].numel() == 0
    restriction = restrict_training(layer, chosen)
    # decoupled weight decay moves every entry, gradient or not: the mask must hold anyway
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1, weight_decay=0.5)
    for _ in range(3):
        layer(torch.randn(8, 6)).square().sum().backward()
        opt.step()
        opt.zero_grad()
    restriction.remove()
    moved = (layer.weight.detach() != before["weight"]).flatten()
    assert moved.nonzero().flatten().tolist() == [20, 21, 22, 23]
    assert torch.equal(layer.bias.detach(), before["bias"])


def test_a_fish_contributor_sends_exactly_its_mask(tiny_model_dir, toy_task_files):
    from coldfusion.contributors.contributor import Contributor
    from coldfusion.models.encoder import Encoder
    from coldfusion.tasks import TaskSpec, load_task
    from coldfusion.training import FinetuneSettings

    encoder = Encoder.load(str(tiny_model_dir))
    task = load_task(TaskSpec(name="sentiment", path=toy_task_files["sentiment"]))
    s = EncodingSettings(kind="sparse", score="fisher", density=0.05, dtype="float32")
    result = Contributor(task, encoder, finetune_settings=FinetuneSettings(batch_size=16, weight_decay=0.1),
                         max_length=32, pooling="mean", examples_per_iteration=64, validation_examples=30,
                         keep_head=False, seed=0, statistics_examples=32, encoding=s).contribute(encoder.pretrained, 0)
    sent = sum(v.numel() for k, v in result.body.items() if k.endswith(".indices"))
    params = sum(v.numel() for v in encoder.new_body().parameters())
    assert sent == round(0.05 * params)  # the mask, chosen before training, whatever the deltas became
    values = torch.cat([v for k, v in result.body.items() if k.endswith(".values")])
    assert (values != 0).float().mean() > 0.5  # and the mask is where training moved the weights
