import pytest
import torch

from coldfusion.fusion import REGISTRY, fuse_files, get_operator
from coldfusion.infra.errors import ColdFusionError
from coldfusion.io.checkpoint import save_tensors


def write(tmp_path, name, tensors):
    path = tmp_path / f"{name}.safetensors"
    save_tensors(path, tensors)
    return path


def test_average_known_answer(tmp_path):
    a = write(tmp_path, "a", {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "b": torch.tensor([0.0, 10.0])})
    b = write(tmp_path, "b", {"w": torch.tensor([[3.0, 2.0], [1.0, 0.0]]), "b": torch.tensor([2.0, -10.0])})
    c = write(tmp_path, "c", {"w": torch.tensor([[2.0, 2.0], [2.0, 5.0]]), "b": torch.tensor([1.0, 3.0])})
    fused = fuse_files([a, b, c], "average")
    assert torch.allclose(fused["w"], torch.tensor([[2.0, 2.0], [2.0, 3.0]]))
    assert torch.allclose(fused["b"], torch.tensor([1.0, 1.0]))


def test_weighted_known_answer(tmp_path):
    a = write(tmp_path, "a", {"w": torch.tensor([0.0, 4.0])})
    b = write(tmp_path, "b", {"w": torch.tensor([8.0, 0.0])})
    fused = fuse_files([a, b], "weighted", weights=[3, 1])  # 3 vs 1 training examples
    assert torch.allclose(fused["w"], torch.tensor([2.0, 3.0]))


def test_weighted_with_equal_counts_equals_average(tmp_path):
    torch.manual_seed(0)
    paths = [write(tmp_path, str(i), {"w": torch.randn(5, 7), "v": torch.randn(3)}) for i in range(4)]
    avg = fuse_files(paths, "average")
    wtd = fuse_files(paths, "weighted", weights=[50] * 4)
    for k in avg:
        assert torch.allclose(avg[k], wtd[k], atol=1e-7)


# Parameters under which fusing identical models must return the model exactly
# (TIES and DARE at density < 1 deliberately drop entries, so they are checked at 1).
IDENTITY_PARAMS = {"ties": {"density": 1.0}, "dare": {"density": 1.0}}


@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_fusing_identical_models_returns_the_model(tmp_path, method):
    torch.manual_seed(1)
    model = {"w": torch.randn(4, 4), "b": torch.randn(4)}
    base = write(tmp_path, "base", {"w": torch.randn(4, 4), "b": torch.randn(4)})
    paths = [write(tmp_path, str(i), model) for i in range(3)]
    stats = None
    if REGISTRY[method].needs_stats == "fisher":
        stats = [write(tmp_path, f"f{i}", {k: torch.rand_like(v) for k, v in model.items()}) for i in range(3)]
    elif REGISTRY[method].needs_stats == "gram":
        x = [torch.randn(10, 4) for _ in range(3)]
        stats = [write(tmp_path, f"g{i}", {"w": xi.T @ xi}) for i, xi in enumerate(x)]
    fused = fuse_files(paths, method, weights=[1, 2, 3], base=base, stats=stats, **IDENTITY_PARAMS.get(method, {}))
    for k in model:
        assert torch.allclose(fused[k], model[k], atol=1e-6)


def test_dtype_is_kept_and_integer_buffers_must_agree(tmp_path):
    a = write(tmp_path, "a", {"h": torch.tensor([1.0, 3.0], dtype=torch.float16), "ids": torch.arange(4)})
    b = write(tmp_path, "b", {"h": torch.tensor([3.0, 5.0], dtype=torch.float16), "ids": torch.arange(4)})
    fused = fuse_files([a, b])
    assert fused["h"].dtype == torch.float16 and torch.equal(fused["h"], torch.tensor([2.0, 4.0], dtype=torch.float16))
    assert torch.equal(fused["ids"], torch.arange(4))
    c = write(tmp_path, "c", {"h": torch.tensor([3.0, 5.0], dtype=torch.float16), "ids": torch.arange(4) + 1})
    with pytest.raises(ColdFusionError, match="non-float tensor 'ids' differs"):
        fuse_files([a, c])


def test_mismatched_keys_name_the_file(tmp_path):
    a = write(tmp_path, "a", {"w": torch.zeros(2), "x": torch.zeros(1)})
    b = write(tmp_path, "b", {"w": torch.zeros(2)})
    with pytest.raises(ColdFusionError, match=r"b\.safetensors does not have the same tensors.*missing \['x'\]"):
        fuse_files([a, b])


def test_bad_weights_and_unknown_method(tmp_path):
    a = write(tmp_path, "a", {"w": torch.zeros(2)})
    with pytest.raises(ColdFusionError, match="non-negative"):
        fuse_files([a], weights=[-1.0])
    with pytest.raises(ColdFusionError, match="unknown fusion method 'nope'; available: average"):
        get_operator("nope")
    with pytest.raises(ColdFusionError, match="nothing to fuse"):
        fuse_files([])


def test_streaming_reads_each_tensor_lazily(tmp_path, monkeypatch):
    """The operator sees a lazy sequence: no tensor is read before the operator asks for it."""
    from coldfusion.io.tensorfile import SafetensorsReader

    paths = [write(tmp_path, str(i), {"a": torch.full((3,), float(i)), "b": torch.ones(2) * i}) for i in range(4)]
    reads = []
    original = SafetensorsReader.read

    def counting(self, name, start=0, stop=None, out=None):
        reads.append((name, self.label))
        return original(self, name, start, stop, out)

    monkeypatch.setattr(SafetensorsReader, "read", counting)
    fused = fuse_files(paths)
    assert torch.allclose(fused["a"], torch.full((3,), 1.5))
    # name by name: all of "a" is read before any of "b"
    names = [n for n, _ in reads]
    assert names == sorted(names)
    # ... and every contributed tensor is read exactly once
    assert sorted(reads) == [(n, str(p)) for n in ("a", "b") for p in paths]


def test_reader_reads_every_dtype_like_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    from coldfusion.io.tensorfile import SafetensorsReader

    tensors = {"f32": torch.randn(3, 4), "f16": torch.randn(5).half(), "bf16": torch.randn(2, 2).bfloat16(),
               "i64": torch.arange(6).reshape(2, 3), "b": torch.tensor([True, False]), "empty": torch.zeros(0, 3)}
    save_file(tensors, tmp_path / "m.safetensors")
    expected = load_file(tmp_path / "m.safetensors")
    with SafetensorsReader([tmp_path / "m.safetensors"]) as reader:
        assert reader.keys() == set(tensors)
        for k, v in expected.items():
            got = reader.get_tensor(k)
            assert got.dtype == v.dtype and got.shape == v.shape and torch.equal(got, v), k
            if v.numel():  # a slice read into a caller's buffer, which must match it
                buffer = torch.empty(v.numel() - 1, dtype=v.dtype)
                assert reader.read(k, 1, v.numel(), out=buffer) is buffer
                assert torch.equal(buffer, v.flatten()[1:]), k
        with pytest.raises(ValueError, match="contiguous torch.float32 buffer of 11 entries"):
            reader.read("f32", 1, 12, out=torch.empty(11, dtype=torch.float16))
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-8])
    with pytest.raises(ColdFusionError, match="outside the file's 108 data bytes"):  # refused when opened
        SafetensorsReader([tmp_path / "cut.safetensors"])
    (tmp_path / "junk.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00nope!")
    with pytest.raises(ColdFusionError, match="not a readable safetensors file"):
        SafetensorsReader([tmp_path / "junk.safetensors"])


# Parameters that make every elementwise operator exercise its whole path.
SLICING_PARAMS = {"ties": {"density": 0.3}, "dare": {"density": 0.6, "seed": 3},
                  "trimmed_mean": {"trim": 0.25}}


@pytest.mark.parametrize("method", sorted(m for m, op in REGISTRY.items() if op.elementwise))
def test_slicing_does_not_change_the_fusion(tmp_path, monkeypatch, method):
    """The engine fuses big tensors in flat slices; any slice size must give the same result."""
    from coldfusion.fusion import dare, streaming

    torch.manual_seed(2)
    shapes = {"w": (13, 7), "v": (5,), "empty": (0, 3)}
    make = lambda: {k: torch.randint(-4, 5, s).float() / 4 for k, s in shapes.items()}  # noqa: E731 (many ties)
    paths = [write(tmp_path, str(i), make()) for i in range(4)]
    base = write(tmp_path, "base", make())
    stats = [write(tmp_path, f"f{i}", {k: torch.rand(s) for k, s in shapes.items()}) for i in range(4)]
    kwargs = dict(weights=[1, 2, 3, 4], base=base, stats=stats if REGISTRY[method].needs_stats else None,
                  **SLICING_PARAMS.get(method, {}))
    monkeypatch.setattr(dare, "BLOCK", 8)
    whole = fuse_files(paths, method, **kwargs)
    for size in (1, 8, 24, 50):
        monkeypatch.setattr(streaming, "SLICE", size)
        monkeypatch.setattr(streaming, "SLICE_MODELS", 1)
        sliced = fuse_files(paths, method, **kwargs)
        for k in shapes:
            assert sliced[k].shape == whole[k].shape
            assert torch.allclose(sliced[k], whole[k], atol=1e-6), (size, k)


def test_same_size_different_shape_is_refused(tmp_path):
    a = write(tmp_path, "a", {"w": torch.zeros(2, 3)})
    b = write(tmp_path, "b", {"w": torch.zeros(3, 2)})
    with pytest.raises(ColdFusionError, match=r"shape \[3, 2\] in .*b.safetensors but \[2, 3\]"):
        fuse_files([a, b])


def test_writer_streams_a_valid_safetensors_file(tmp_path):
    import hashlib

    from safetensors.torch import load_file

    from coldfusion.io.tensorfile import SafetensorsReader, SafetensorsWriter

    tensors = {"a": torch.randn(10, 3), "b16": torch.randn(7).bfloat16(), "empty": torch.zeros(0, 2),
               "ids": torch.arange(5), "mask": torch.tensor([True, False, True])}
    layout = {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}
    path = tmp_path / "out.safetensors"
    with SafetensorsWriter(path, layout, metadata={"format": "pt"}) as writer:
        flat = tensors["a"].flatten()
        for start in range(0, 30, 8):  # in slices
            writer.write("a", start, flat[start:start + 8])
        for k in ("b16", "ids", "mask"):  # the empty tensor needs no write
            writer.write(k, 0, tensors[k])
        assert not path.exists()  # nothing visible before the commit
        sha = writer.commit()
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    loaded = load_file(path)
    assert set(loaded) == set(tensors)
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k
    with SafetensorsReader([path]) as reader:
        assert torch.equal(reader.read("a", 4, 9), tensors["a"].flatten()[4:9])

    other = tmp_path / "bad.safetensors"
    writer = SafetensorsWriter(other, layout)
    with pytest.raises(ColdFusionError, match=r"wrote b16\[0:\] where a\[0:\] was due"):
        writer.write("b16", 0, tensors["b16"])
    writer.write("a", 0, tensors["a"])
    with pytest.raises(ColdFusionError, match=r"tensors \['b16', 'ids', 'mask'\] were never written"):
        writer.commit()
    assert not other.exists() and list(tmp_path.iterdir()) == [path]  # no temporary left behind


@pytest.mark.parametrize("method", ["average", "task_arithmetic", "ties", "median"])
def test_elementwise_fusion_reads_bounded_slices(tmp_path, monkeypatch, method):
    """Memory does not grow with the number of models: an elementwise operator only ever
    sees one slice per model; whole tensors are read one model at a time, by `prepare`."""
    from coldfusion.fusion import streaming
    from coldfusion.io.tensorfile import SafetensorsReader

    torch.manual_seed(3)
    paths = [write(tmp_path, str(i), {"w": torch.randn(40, 5)}) for i in range(6)]
    base = write(tmp_path, "base", {"w": torch.randn(40, 5)})
    sizes = []
    original = SafetensorsReader.read

    def recording(self, name, start=0, stop=None, out=None):
        out = original(self, name, start, stop, out)
        sizes.append(out.numel())
        return out

    monkeypatch.setattr(SafetensorsReader, "read", recording)
    monkeypatch.setattr(streaming, "SLICE", 16)
    monkeypatch.setattr(streaming, "SLICE_MODELS", 1)
    fuse_files(paths, method, base=base)
    whole = [s for s in sizes if s > 16]
    assert all(s == 200 for s in whole)
    # TIES reads each model's whole tensor once (and the base's) to find its cut; nobody else does
    assert len(whole) == (7 if method == "ties" else 0)


@pytest.mark.parametrize("hold", [0, 1 << 20])
def test_threads_do_not_change_the_fusion(tmp_path, monkeypatch, hold):
    """A compute-bound operator's slices, models and column ranges are fused on as many
    threads as torch may use; every operator gives bit for bit what it gives on one thread
    (TIES whether it holds whole tensors or cuts first and merges slice by slice)."""
    from coldfusion.fusion import dare, streaming

    g = torch.Generator().manual_seed(4)
    shapes = {"w": (37, 29), "v": (300,), "x": (3, 5)}
    make = lambda: {k: torch.randint(-6, 7, s, generator=g).float() / 4 for k, s in shapes.items()}  # noqa: E731
    paths = [write(tmp_path, str(i), make()) for i in range(5)]
    base = write(tmp_path, "base", make())
    stats = [write(tmp_path, f"s{i}", {k: torch.rand(s, generator=g) for k, s in shapes.items()}) for i in range(5)]
    grams = [write(tmp_path, f"g{i}", {"w": (lambda a: a.T @ a)(torch.randn(40, 29, generator=g))}) for i in range(5)]
    monkeypatch.setattr(streaming, "SLICE", 64)
    monkeypatch.setattr(streaming, "HOLD_BYTES", hold)
    monkeypatch.setattr(dare, "BLOCK", 16)
    before = torch.get_num_threads()
    try:
        for method, op in sorted(REGISTRY.items()):
            kwargs = dict(weights=[1, 2, 3, 1, 2], base=base, **SLICING_PARAMS.get(method, {}),
                          stats={"fisher": stats, "gram": grams}.get(op.needs_stats))
            torch.set_num_threads(1)
            one = fuse_files(paths, method, **kwargs)
            torch.set_num_threads(2)
            two = fuse_files(paths, method, **kwargs)
            for k in one:
                assert torch.equal(one[k], two[k]), (method, k)
    finally:
        torch.set_num_threads(before)


def test_fusion_leaves_the_thread_setting_as_it_found_it(tmp_path, monkeypatch):
    """The engine pins threads while it fuses (a slice on one thread each); the caller's
    torch thread setting is the same afterwards, for memory- and compute-bound operators."""
    from coldfusion.fusion import streaming

    monkeypatch.setattr(streaming, "SLICE", 4)
    paths = [write(tmp_path, str(i), {"w": torch.randn(40)}) for i in range(2)]
    base = write(tmp_path, "base", {"w": torch.zeros(40)})
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for method in ("average", "ties"):
            fused = fuse_files(paths, method, base=base, **({"density": 1.0} if method == "ties" else {}))
            if method == "average":
                assert torch.allclose(fused["w"], (load(paths[0]) + load(paths[1])) / 2)
            assert torch.get_num_threads() == 2, method
    finally:
        torch.set_num_threads(before)


def load(path):
    from safetensors.torch import load_file

    return load_file(path)["w"]


def test_what_was_yielded_does_not_change_as_the_engine_reads_on(tmp_path, monkeypatch):
    """What the stream yielded stays what it was while the engine reads the next tensors,
    even from an operator that returns a view of the tensors it was handed."""
    import dataclasses

    from coldfusion.fusion import registry, streaming
    from coldfusion.fusion.task_vectors import stack_float
    from coldfusion.io.tensorfile import SafetensorsReader

    def first_model(tensors, weights, base, prepared=None):
        return stack_float(tensors)[0]  # a view of what the engine read

    ties = registry.get_operator("ties")
    monkeypatch.setitem(registry.REGISTRY, "first", dataclasses.replace(ties, name="first", fuse=first_model))
    g = torch.Generator().manual_seed(0)
    models = [{"a": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g)} for _ in range(3)]
    paths = [write(tmp_path, str(i), m) for i, m in enumerate(models)]
    base = write(tmp_path, "base", {"a": torch.zeros(3, 4), "b": torch.zeros(5)})
    with SafetensorsReader([base]) as b:
        readers = [SafetensorsReader([p]) for p in paths]
        yielded = list(streaming.fuse_stream(readers, "first", base=b))  # held, not copied, across tensors
        for r in readers:
            r.close()
    assert [n for n, _, _ in yielded] == ["a", "b"]
    assert torch.equal(yielded[0][2], models[0]["a"].flatten())
    assert torch.equal(yielded[1][2], models[0]["b"])


def test_slices_returned_as_views_of_a_reused_buffer_are_kept(tmp_path, monkeypatch):
    """An operator that returns a view of the slices it was handed still yields what it
    returned, however long the caller keeps the slices, on one thread or two."""
    import dataclasses

    from coldfusion.fusion import registry, streaming
    from coldfusion.fusion.task_vectors import stack_float
    from coldfusion.io.tensorfile import SafetensorsReader

    def first_model(tensors, weights):
        return stack_float(tensors)[0]  # a view into the thread's buffer

    average = registry.get_operator("average")
    first = dataclasses.replace(average, name="first", fuse=first_model, compute_bound=True)  # on threads
    monkeypatch.setitem(registry.REGISTRY, "first", first)
    monkeypatch.setattr(streaming, "SLICE", 8)
    monkeypatch.setattr(streaming, "SLICE_MODELS", 1)
    g = torch.Generator().manual_seed(1)
    models = [{"a": torch.randn(9, 7, generator=g), "b": torch.randn(30, generator=g)} for _ in range(3)]
    paths = [write(tmp_path, str(i), m) for i, m in enumerate(models)]
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            readers = [SafetensorsReader([p]) for p in paths]
            yielded = list(streaming.fuse_stream(readers, "first"))  # every slice kept, none copied
            for r in readers:
                r.close()
            assert len(yielded) > 4
            for name, start, values in yielded:
                expected = models[0][name].flatten()[start:start + values.numel()]
                assert torch.equal(values, expected), (threads, name, start)
    finally:
        torch.set_num_threads(before)
