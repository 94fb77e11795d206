"""Known answers and properties of the task-vector and robust operators."""

import math

import numpy as np
import pytest
import torch

from coldfusion.fusion import fuse_files, get_operator
from coldfusion.fusion.task_vectors import sign_consensus_merge
from coldfusion.fusion.ties import MagnitudeCut
from coldfusion.fusion.ties_kernel import magnitude_cut, ties_merge
from coldfusion.infra.errors import ColdFusionError
from coldfusion.io.checkpoint import save_tensors


@pytest.fixture
def files(tmp_path):
    """Write named single-tensor models; returns a function name -> path."""
    def write(name, values):
        path = tmp_path / f"{name}.safetensors"
        save_tensors(path, {"w": torch.tensor(values, dtype=torch.float32)})
        return path
    return write


def fused(paths, method, **kw):
    return fuse_files(paths, method, **kw)["w"]


def test_task_arithmetic_known_answer(files):
    b, m1, m2 = files("b", [1.0, 1.0]), files("m1", [2.0, 3.0]), files("m2", [0.0, 5.0])
    # t1 = [1, 2], t2 = [-1, 4]
    assert torch.allclose(fused([m1, m2], "task_arithmetic", base=b), torch.tensor([1.0, 4.0]))
    assert torch.allclose(fused([m1, m2], "task_arithmetic", base=b, scale=0.5), torch.tensor([1.0, 2.5]))
    assert torch.allclose(fused([m1, m2], "task_arithmetic", base=b, normalize=False), torch.tensor([1.0, 7.0]))
    # mergekit spells the scale `lambda`
    assert torch.allclose(fused([m1, m2], "task_arithmetic", base=b, **{"lambda": 0.5}), torch.tensor([1.0, 2.5]))
    # scale 1 with normalized weights is the plain average
    assert torch.allclose(fused([m1, m2], "task_arithmetic", base=b), fused([m1, m2], "average"))


def test_ties_known_answer(files):
    b = files("b", [0.0, 0.0, 0.0, 0.0])
    t1 = files("t1", [3.0, -1.0, 0.5, 2.0])   # top-2 -> [3, 0, 0, 2]
    t2 = files("t2", [-2.0, -2.0, 1.0, -1.0])  # top-2 -> [-2, -2, 0, 0]
    t3 = files("t3", [1.0, 4.0, -3.0, -0.2])   # top-2 -> [0, 4, -3, 0]
    # elected signs by mass: +, +, -, + ; agreeing entries: 3 | 4 | -3 | 2
    out = fused([t1, t2, t3], "ties", base=b, density=0.5)
    assert torch.allclose(out, torch.tensor([3.0, 4.0, -3.0, 2.0]))
    # without trimming: col0 +(3-2+1): mean of {3, 1} = 2; col1 +(1): {4}; col2 -(-1.5): {-3}; col3 +(0.8): {2}
    out = fused([t1, t2, t3], "ties", base=b, density=1.0)
    assert torch.allclose(out, torch.tensor([2.0, 4.0, -3.0, 2.0]))
    # normalize: false sums the agreeing entries instead (mergekit's convention)
    out = fused([t1, t2, t3], "ties", base=b, density=1.0, normalize=False)
    assert torch.allclose(out, torch.tensor([4.0, 4.0, -3.0, 2.0]))
    # an exact tie of signed mass elects +
    z1, z2 = files("z1", [1.0]), files("z2", [-1.0])
    assert fused([z1, z2], "ties", base=files("z0", [0.0]), density=1.0).item() == 1.0


def test_ties_with_density_one_and_one_model_equals_task_arithmetic(files):
    torch.manual_seed(0)
    b, m = files("b", torch.randn(50).tolist()), files("m", torch.randn(50).tolist())
    for scale in (1.0, 0.7):
        assert torch.allclose(fused([m], "ties", base=b, density=1.0, scale=scale),
                              fused([m], "task_arithmetic", base=b, scale=scale), atol=1e-6)


def trim(deltas: torch.Tensor, cuts, offset: int = 0) -> torch.Tensor:
    """Reference trim, entry by entry: zero the entries of task vectors (n, length) outside
    their cuts (flat positions start at `offset`)."""
    positions = torch.arange(offset, offset + deltas.shape[1])
    for i, cut in enumerate(cuts):
        magnitude = deltas[i].abs()
        keep = (magnitude > cut.value) | ((magnitude == cut.value) & (positions <= cut.last_tie))
        deltas[i] = torch.where(keep, deltas[i], torch.zeros(()))
    return deltas


def kept(d: torch.Tensor, density: float) -> torch.Tensor:
    return trim(d.flatten().unsqueeze(0).clone(), [magnitude_cut(d, density)]).view_as(d)


def test_magnitude_cut_keeps_exactly_the_top_k():
    d = torch.tensor([[0.1, -5.0], [3.0, -0.2]])
    assert torch.equal(kept(d, 0.5), torch.tensor([[0.0, -5.0], [3.0, 0.0]]))
    assert torch.equal(kept(d, 1.0), d)
    assert torch.count_nonzero(kept(torch.randn(1000), 0.1)) == 100
    assert torch.count_nonzero(kept(torch.randn(7), 0.01)) == 1  # never the whole tensor (mergekit's k >= 1)
    # ties at the cut: exactly k kept, the lowest positions first
    ties = torch.tensor([1.0, -2.0, 2.0, 0.5, 2.0, -2.0])
    assert torch.equal(kept(ties, 0.5), torch.tensor([0.0, -2.0, 2.0, 0.0, 2.0, 0.0]))


def test_magnitude_cut_is_the_same_on_any_slicing():
    """The engine applies one cut slice by slice: every slicing must give the whole-tensor mask."""
    d = torch.randint(-3, 4, (1000,)).float()  # many ties
    cut = magnitude_cut(d, 0.3)
    whole = trim(d.unsqueeze(0).clone(), [cut])
    assert int(whole.count_nonzero()) == 300
    for size in (1, 7, 64, 333):
        sliced = torch.cat([trim(d[s:s + size].unsqueeze(0).clone(), [cut], offset=s) for s in range(0, 1000, size)],
                           dim=1)
        assert torch.equal(sliced, whole), size


@pytest.mark.parametrize("threads", [1, 2])
def test_sampled_magnitude_cut_is_exact(monkeypatch, threads):
    """Large task vectors are cut via a sampled bracket (on one thread, or two halves on
    two); the answer is the full selection's, whether the bracket holds (normal values,
    ties across the cut) or is abandoned for a full selection (huge tie groups; a sample
    blind to the data)."""
    from coldfusion.fusion import ties_kernel

    monkeypatch.setattr(ties_kernel, "PARALLEL_MIN", 1000)
    exact_calls = []
    exact = ties_kernel._exact_cut
    monkeypatch.setattr(ties_kernel, "_exact_cut", lambda *a: exact_calls.append(1) or exact(*a))
    g = torch.Generator().manual_seed(1)
    n = 5 * ties_kernel.SAMPLE
    smooth = torch.randn(n, generator=g) * torch.rand(n, generator=g)
    coarse = torch.randint(-3, 4, (n,), generator=g).float()  # a seventh of the entries tie at every level
    rounded = (torch.randn(n, generator=g) * 50).round() / 50  # ties straddle the cut
    hidden = torch.randn(n, generator=g)
    ties_kernel.sample_view(hidden.numpy())[:] = 0  # every sampled entry is unchanged: the bracket is [0, 0]
    for data, sampled in ((smooth, True), (rounded, True), (coarse, False), (hidden, False)):
        base = torch.randn(n, generator=g)
        x = (base + data).numpy()
        for density in (0.01, 0.2, 0.5, 0.9):
            exact_calls.clear()
            got = ties_kernel.model_cut(x, base.numpy(), density, parts=threads)
            assert (not exact_calls) == sampled, density
            magnitudes = lambda x=x, b=base.numpy(): np.abs(x - b)  # noqa: E731
            assert got == exact(magnitudes(), max(1, int(density * n)), magnitudes), density


@pytest.mark.parametrize("normalize", [True, False])
def test_compiled_ties_merge_equals_its_definition(normalize):
    """The compiled loop = trim, then sign election and disjoint mean written as torch
    operations, on every slicing, with ties at the cuts and uneven weights."""
    g = torch.Generator().manual_seed(0)
    base = torch.randint(-2, 3, (500,), generator=g).float() / 2
    models = base + torch.randint(-3, 4, (5, 500), generator=g).float() / 4  # many ties, many zeros
    weights = torch.tensor([1.0, 0.5, 2.0, 0.0, 1.5])
    for density in (0.0, 0.15, 0.5, 1.0):
        cuts = [magnitude_cut(m - base, density) for m in models]
        expected = base + 0.7 * sign_consensus_merge(trim(models - base, cuts), weights, normalize)
        for size in (1, 33, 500):
            got = torch.cat([ties_merge(models[:, s:s + size].contiguous(), base[s:s + size], cuts, weights,
                                        offset=s, normalize=normalize, scale=0.7) for s in range(0, 500, size)])
            assert torch.allclose(got, expected, atol=1e-6), (density, size)
        blocked = ties_merge(models, base, cuts, weights, normalize=normalize, scale=0.7, block=7)
        assert torch.allclose(blocked, expected, atol=1e-6), density  # running sums 7 columns at a time
    for workers in (2, 3):  # column ranges of whole blocks on several threads: the same, bit for bit
        split = ties_merge(models, base, cuts, weights, normalize=normalize, scale=0.7, block=7, workers=workers)
        assert torch.equal(split, blocked), workers
    # a magnitude cut of -inf keeps everything; +inf nothing
    everything = [MagnitudeCut(-math.inf, 500)] * 5
    assert torch.allclose(ties_merge(models, base, everything, weights, normalize=normalize),
                          base + sign_consensus_merge(models - base, weights, normalize), atol=1e-6)


def test_dare_density_one_is_task_arithmetic_or_ties(files):
    torch.manual_seed(1)
    b = files("b", torch.randn(40).tolist())
    ms = [files(f"m{i}", torch.randn(40).tolist()) for i in range(3)]
    assert torch.allclose(fused(ms, "dare", base=b, density=1.0), fused(ms, "task_arithmetic", base=b), atol=1e-6)
    assert torch.allclose(fused(ms, "dare", base=b, density=1.0, variant="ties"),
                          fused(ms, "ties", base=b, density=1.0), atol=1e-6)


def test_dare_is_reproducible_and_unbiased(files):
    torch.manual_seed(2)
    b = files("b", [0.0] * 20000)
    m = files("m", torch.ones(20000).tolist())
    a1 = fused([m], "dare", base=b, density=0.3, seed=5)
    a2 = fused([m], "dare", base=b, density=0.3, seed=5)
    a3 = fused([m], "dare", base=b, density=0.3, seed=6)
    assert torch.equal(a1, a2) and not torch.equal(a1, a3)
    kept = a1 != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.02      # about 30% of entries survive ...
    assert torch.allclose(a1[kept], torch.full_like(a1[kept], 1 / 0.3))  # ... rescaled by 1 / density
    assert abs(a1.mean().item() - 1.0) < 0.05                 # so the expected task vector is kept
    with pytest.raises(ColdFusionError, match="variant: Input should be 'linear' or 'ties'"):
        fused([m], "dare", base=b, variant="magic")
    with pytest.raises(ColdFusionError, match="density: Input should be greater than 0"):
        fused([m], "dare", base=b, density=0.0)


@pytest.mark.parametrize(("method", "params", "message"), [
    ("ties", {"density": -0.3}, "density: Input should be greater than 0"),  # silently returned the base
    ("ties", {"density": 1.5}, "density: Input should be less than or equal to 1"),  # was accepted
    ("ties", {"scale": float("inf")}, "scale: Input should be a finite number"),
    ("dare", {"density": 0}, "density: Input should be greater than 0"),
    ("regmean", {"alpha": 2}, "alpha: Input should be less than or equal to 1"),
    ("fisher", {"floor": 0}, "floor: Input should be greater than 0"),
    ("task_arithmetic", {"normalize": "sometimes"}, "normalize: Input should be a valid boolean"),
])
def test_fusion_parameters_out_of_range_are_refused_before_any_training(tmp_path, method, params, message):
    import yaml

    from coldfusion.collab.config import load_config

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"tasks": ["bbc_topic"], "fusion": {"method": method, "params": params}}))
    with pytest.raises(ColdFusionError, match=message):
        load_config(path)


def test_median_and_trimmed_mean_known_answers(files):
    odd = [files(f"o{i}", [v]) for i, v in enumerate([1.0, 5.0, 3.0])]
    even = [files(f"e{i}", [v]) for i, v in enumerate([1.0, 2.0, 10.0, 4.0])]
    assert fused(odd, "median").item() == 3.0
    assert fused(even, "median").item() == 3.0  # (2 + 4) / 2
    five = [files(f"f{i}", [v]) for i, v in enumerate([1.0, 2.0, 3.0, 100.0, -50.0])]
    assert fused(five, "trimmed_mean", trim=0.2).item() == pytest.approx(2.0)  # drops -50 and 100
    assert fused(five, "trimmed_mean", trim=0.0).item() == pytest.approx(56.0 / 5)
    with pytest.raises(ColdFusionError, match="trim: Input should be less than 0.5"):
        fused(five, "trimmed_mean", trim=0.5)


def test_robust_operators_resist_one_outlier(files):
    honest = [files(f"h{i}", [1.0 + 0.01 * i] * 3) for i in range(4)]
    poisoned = honest + [files("evil", [1000.0] * 3)]
    assert fused(poisoned, "average").max() > 100
    assert torch.allclose(fused(poisoned, "median"), torch.full((3,), 1.02), atol=1e-6)
    assert torch.allclose(fused(poisoned, "trimmed_mean", trim=0.2), torch.full((3,), 1.02), atol=1e-6)


def test_norm_clipping_known_answer(tmp_path):
    """Norms are over the whole model (both tensors), and the default bound is their median."""
    def model(name, w, v):
        path = tmp_path / f"{name}.safetensors"
        save_tensors(path, {"w": torch.tensor(w), "v": torch.tensor(v)})
        return path

    base = model("b", [0.0, 0.0], [0.0])
    small, medium, big = model("s", [3.0, 0.0], [4.0]), model("m", [0.0, 6.0], [8.0]), model("l", [0.0, 0.0], [100.0])
    # delta norms 5, 10, 100: the median (10) bounds them; big is scaled by 0.1, the others kept
    out = fuse_files([small, medium, big], "norm_clipping", base=base)
    assert torch.allclose(out["w"], torch.tensor([1.0, 2.0]))
    assert torch.allclose(out["v"], torch.tensor([(4 + 8 + 10) / 3]))
    clipped = fuse_files([small, medium, big], "norm_clipping", base=base, clip=5.0)  # scales 1, 0.5, 0.05
    assert torch.allclose(clipped["v"], torch.tensor([(4 + 4 + 5) / 3]))
    # norms given by the caller (the repository measured them while validating) are used as they are
    given = fuse_files([small, medium, big], "norm_clipping", base=base, norms=[5.0, 10.0, 10.0])
    assert torch.allclose(given["v"], torch.tensor([(4 + 8 + 100) / 3]))
    # a bound above every norm is the plain average
    assert torch.allclose(fuse_files([small, medium, big], "norm_clipping", base=base, clip=1e3)["v"],
                          fuse_files([small, medium, big], "average")["v"])
    with pytest.raises(ColdFusionError, match="clip: Input should be greater than 0"):
        fuse_files([small, big], "norm_clipping", base=base, clip=0.0)


def test_robust_operators_bound_a_boosted_update(files):
    """One contributor scales its update a hundredfold: the average moves with it, norm
    clipping, median and trimmed mean stay near the honest ones."""
    base = files("b", [0.0] * 4)
    honest = [files(f"h{i}", [1.0 + 0.1 * i] * 4) for i in range(4)]
    boosted = honest + [files("boost", [-100.0] * 4)]
    assert fused(boosted, "average").mean() < -15
    for method, kw in [("norm_clipping", {"base": base}), ("median", {}), ("trimmed_mean", {"trim": 0.2})]:
        assert 0.5 < float(fused(boosted, method, **kw).mean()) < 1.5, method


def test_parameters_are_validated(files):
    m = files("m", [1.0])
    with pytest.raises(ColdFusionError, match=r"'ties' has no parameter \['densty'\]; its parameters: density"):
        fused([m], "ties", base=m, densty=0.5)
    with pytest.raises(ColdFusionError, match="needs a base model"):
        fused([m], "ties")
    assert get_operator("ties").parameters == {"density": 0.2, "scale": 1.0, "normalize": True}
    assert get_operator("average").parameters == {}


def stats_files(tmp_path, name, tensors_list):
    paths = []
    for i, tensors in enumerate(tensors_list):
        path = tmp_path / f"{name}{i}.safetensors"
        save_tensors(path, tensors)
        paths.append(path)
    return paths


def test_fisher_known_answer_and_floor(files, tmp_path):
    m1, m2 = files("m1", [0.0, 10.0]), files("m2", [10.0, 0.0])
    fishers = stats_files(tmp_path, "F", [{"w": torch.tensor([3.0, 1.0])}, {"w": torch.tensor([1.0, 1.0])}])
    assert torch.allclose(fused([m1, m2], "fisher", stats=fishers), torch.tensor([2.5, 5.0]))
    # weights multiply the Fisher: (1*3*0 + 3*1*10) / (3 + 3) = 5; (1*1*10 + 3*1*0) / 4 = 2.5
    assert torch.allclose(fused([m1, m2], "fisher", stats=fishers, weights=[1, 3]), torch.tensor([5.0, 2.5]))
    zeros = stats_files(tmp_path, "Z", [{"w": torch.zeros(2)}, {"w": torch.zeros(2)}])
    assert torch.allclose(fused([m1, m2], "fisher", stats=zeros), fused([m1, m2], "average"))  # floored, equal


def test_fisher_with_equal_fishers_equals_average(files, tmp_path):
    torch.manual_seed(3)
    ms = [files(f"m{i}", torch.randn(30).tolist()) for i in range(3)]
    same = torch.rand(30) + 0.1
    fishers = stats_files(tmp_path, "F", [{"w": same}] * 3)
    assert torch.allclose(fused(ms, "fisher", stats=fishers), fused(ms, "average"), atol=1e-6)


def linear_models(tmp_path, weights):
    paths = []
    for i, (w, b) in enumerate(weights):
        path = tmp_path / f"lin{i}.safetensors"
        save_tensors(path, {"layer.weight": w, "layer.bias": b})
        paths.append(path)
    return paths


def test_regmean_with_identity_grams_equals_average(tmp_path):
    torch.manual_seed(4)
    models = linear_models(tmp_path, [(torch.randn(3, 5), torch.randn(3)) for _ in range(3)])
    grams = stats_files(tmp_path, "G", [{"layer.weight": torch.eye(5)}] * 3)
    got = fuse_files(models, "regmean", stats=grams)
    avg = fuse_files(models, "average")
    for k in avg:
        assert torch.allclose(got[k], avg[k], atol=1e-6), k


def test_regmean_one_input_feature_is_a_gram_weighted_average(tmp_path):
    models = linear_models(tmp_path, [(torch.tensor([[2.0]]), torch.zeros(1)), (torch.tensor([[6.0]]), torch.ones(1))])
    grams = stats_files(tmp_path, "G", [{"layer.weight": torch.tensor([[g]])} for g in (3.0, 1.0)])
    got = fuse_files(models, "regmean", stats=grams)
    assert got["layer.weight"].item() == pytest.approx((2 * 3 + 6 * 1) / 4)
    assert got["layer.bias"].item() == pytest.approx(0.5)  # not a linear weight: averaged


def test_regmean_solves_the_joint_least_squares_problem(tmp_path):
    """alpha = 1: the fused W minimizes sum_i |X_i W^T - X_i W_i^T|^2 (checked against lstsq)."""
    torch.manual_seed(5)
    xs = [torch.randn(40, 6, dtype=torch.float64) for _ in range(3)]
    ws = [torch.randn(4, 6, dtype=torch.float64) for _ in range(3)]
    models = linear_models(tmp_path, [(w.float(), torch.zeros(4)) for w in ws])
    grams = stats_files(tmp_path, "G", [{"layer.weight": (x.T @ x).float()} for x in xs])
    got = fuse_files(models, "regmean", stats=grams, alpha=1.0)["layer.weight"].double()
    x_all = torch.cat(xs)
    y_all = torch.cat([x @ w.T for x, w in zip(xs, ws, strict=True)])
    expected = torch.linalg.lstsq(x_all, y_all).solution.T
    assert torch.allclose(got, expected, atol=1e-4)


def test_statistics_are_required(files):
    m = files("m", [1.0])
    with pytest.raises(ColdFusionError, match="needs fisher statistics from every contributor"):
        fused([m, m], "fisher")


def test_cuts_of_whole_tensors_are_the_same_on_threads():
    """The prepare step cuts every model's whole task vector, one or several at a time on
    threads, from a list or from the engine's reader; each cut is the one computed alone."""
    from coldfusion.fusion.ties_kernel import magnitude_cuts

    g = torch.Generator().manual_seed(5)
    n, size = 5, 70_000  # above the size that is cut by a sampled bracket
    base = torch.randn(size, generator=g)
    models = base + torch.randn(n, size, generator=g) * torch.rand(n, 1, generator=g)

    class Engine(list):  # what the engine hands prepare: read_into a buffer, and a scratch
        def read_into(self, i, out):
            return out.copy_(self[i])

    expected = [magnitude_cut(m - base, 0.2) for m in models]
    for room in (size + 10, 2 * size):  # room for one model's tensor, or two
        engine = Engine(models)
        engine.scratch = torch.empty(room)
        for workers in (1, 2):
            assert magnitude_cuts(engine, base, 0.2, workers=workers) == expected, (room, workers)
    assert magnitude_cuts(models, base, 0.2, workers=2) == expected



@pytest.mark.parametrize("normalize", [True, False])
def test_plain_ties_gives_the_compiled_bits(normalize):
    """Without numba, TIES runs in plain torch: the same cuts (small tensors selected
    exactly, large ones the compiled path brackets by a sample) and the same merged bits."""
    from coldfusion.fusion.ties import plain_cut, plain_merge

    g = torch.Generator().manual_seed(3)
    for size in (500, 300_000):
        base = torch.randn(size, generator=g)
        models = base + torch.randn(4, size, generator=g) * torch.rand(4, 1, generator=g)
        models[:, ::5] = base[::5] + (torch.randint(-3, 4, (4, 1), generator=g).float() / 64)  # ties at the cut
        weights = torch.tensor([1.0, 0.5, 2.0, 0.0])
        for density in (0.01, 0.2, 1.0):
            cuts = [magnitude_cut(m - base, density) for m in models]
            assert [plain_cut(m - base, density) for m in models] == cuts, (size, density)
            for start, stop in ((0, size), (7, size // 3), (size // 2, size)):
                compiled = ties_merge(models[:, start:stop].contiguous(), base[start:stop], cuts, weights,
                                      offset=start, normalize=normalize, scale=0.7)
                plain = plain_merge(models[:, start:stop], base[start:stop], cuts, weights, offset=start,
                                    normalize=normalize, scale=0.7)
                assert torch.equal(plain, compiled), (size, density, start)


def test_ties_without_numba_fuses_the_same_files(tmp_path):
    """numba is an optional extra: a process that cannot import it fuses TIES through the
    same engine (a small tensor whole; a large one cut first, then merged slice by slice)
    to the same bytes."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    g = torch.Generator().manual_seed(4)
    # three models of "big" outgrow what the engine holds at once: it is fused in slices
    base = {"big": torch.randn(6_000_000, generator=g), "small": torch.randn(30, 7, generator=g)}
    paths = [tmp_path / "base.safetensors"]
    save_tensors(paths[0], base)
    for i in range(3):
        paths.append(tmp_path / f"m{i}.safetensors")
        save_tensors(paths[-1], {k: v + torch.randn(v.shape, generator=g) * 0.1 for k, v in base.items()})
    code = ("import sys\nsys.modules['numba'] = None  # as if it were not installed\n"
            "from coldfusion.fusion import fuse_files, ties\nfrom coldfusion.io.checkpoint import save_tensors\n"
            "assert not ties.compiled()\n"
            "save_tensors(sys.argv[5], fuse_files(sys.argv[1:4], 'ties', base=sys.argv[4], density=0.3))\n")
    out = tmp_path / "plain.safetensors"
    done = subprocess.run([sys.executable, "-c", code, *map(str, paths[1:]), str(paths[0]), str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    compiled = fuse_files(paths[1:], "ties", base=paths[0], density=0.3)
    plain = load_file(out)
    assert plain.keys() == compiled.keys()
    for name in compiled:
        assert torch.equal(plain[name], compiled[name]), name
