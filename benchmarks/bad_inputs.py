"""A catalogue of hostile and mistaken inputs, over every entry point that reads outside data.

Each case is (kind, what, action, text the refusal must contain). An action either calls
the library (a refusal is a ColdFusionError) or runs the `coldfusion` command in-process
(a refusal is exit status 2 with the message on the terminal). `judge` sorts each outcome
into refused_clearly, refused_unclear (refused, but the message misses the point),
accepted_wrongly or crashed. Part of the cases are generated with hypothesis (fixed seed),
each constructed so that it must be refused.

Used by `benchmarks/reliability.py --parts inputs`.
"""

import json
import os
import pickle
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from typer.testing import CliRunner

Case = tuple[str, str, Callable[[], object], str]


def generated(strategy, count: int) -> list:
    """`count` examples of a hypothesis strategy, the same on every run."""
    found = []

    @settings(max_examples=count, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(value):
        found.append(value)

    collect()
    return found[:count]


def judge(action: Callable[[], object], expected: str) -> tuple[str, str]:
    """(outcome, message) of one case."""
    from coldfusion.infra.errors import ColdFusionError

    try:
        result = action()
    except ColdFusionError as exc:
        message = str(exc)
        return ("refused_clearly" if _has(message, expected) else "refused_unclear"), message
    except Exception as exc:  # noqa: BLE001 (a crash is what this counts)
        return "crashed", f"{type(exc).__name__}: {exc}"
    if hasattr(result, "exit_code"):  # the command line
        message = result.output
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            return "crashed", f"{type(result.exception).__name__}: {result.exception}"
        if result.exit_code == 0:
            return "accepted_wrongly", message
        if result.exit_code == 2 and "Traceback" not in message:
            return ("refused_clearly" if _has(message, expected) else "refused_unclear"), message
        return "crashed", f"exit {result.exit_code}: {message}"
    return "accepted_wrongly", ""


def _has(message: str, expected: str) -> bool:
    squeeze = lambda text: "".join(text.split())  # noqa: E731 (rich wraps lines, even inside words)
    return squeeze(expected) in squeeze(message)


def cases(root: Path) -> list[Case]:
    return (library_cases(root / "library") + admission_cases(root / "admission") + http_cases(root / "http")
            + safetensors_cases(root / "safetensors") + pickle_cases(root / "pickle")
            + model_directory_cases(root / "models") + config_cases(root / "configs") + task_cases(root / "tasks")
            + hub_cases(root / "hub") + command_line_cases(root / "cli") + generated_cases(root / "generated"))


# -- the library: task files, run configs, contributions, uploads --------------------------

def library_cases(root: Path) -> list[Case]:
    from coldfusion.collab.config import load_config, parse_config
    from coldfusion.repository import Repository
    from coldfusion.repository.uploads import read_upload
    from coldfusion.repository.validation import ValidationSettings
    from coldfusion.tasks import load_task

    root.mkdir(parents=True)

    def write(name: str, content: bytes | str) -> Path:
        path = root / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    def task_file(name: str, content: bytes | str, **spec):
        path = write(name, content)
        return lambda: load_task({"name": "t", "path": path, **spec})

    def config_file(name: str, text: str):
        path = write(name, text)
        return lambda: load_config(path)

    repo = Repository(root / "repo")
    clean = {"w": torch.zeros(4, 3), "b": torch.zeros(3), "ids": torch.arange(3)}
    base = repo.add_version(clean, model_source="m")
    honest_count = iter(range(10_000))

    def contribution(change):
        def fuse():
            body = {k: v.clone() for k, v in clean.items()}
            body["w"] += 0.01
            change(body)
            n = next(honest_count)
            honest = [repo.add_contribution({**clean, "w": clean["w"] + 0.01 * (i + 1) + 1e-4 * n},
                                            base_version=base.id, contributor=f"h{i}", task="t", num_examples=1)
                      for i in range(2)]
            bad = repo.add_contribution(body, base_version=base.id, contributor=f"bad{n}", task="t", num_examples=1)
            return repo.fuse(base.id, [c.id for c in honest] + [bad.id], validation=ValidationSettings(min_accepted=3))
        return fuse

    def corrupt_file():
        c = repo.add_contribution({**clean, "w": clean["w"] + 0.0123}, base_version=base.id, contributor="c", task="t",
                                  num_examples=1)
        path = repo.path_of(c.sha256)
        data = bytearray(path.read_bytes())
        data[-2] ^= 0x04
        path.write_bytes(bytes(data))
        return repo.fuse(base.id, [c.id])

    def stale_refused():
        newer = repo.add_version({**clean, "w": clean["w"] + 1}, model_source="m", parent=base.id)
        c = repo.add_contribution({**clean, "w": clean["w"] + 0.0134}, base_version=base.id, contributor="s", task="t",
                                  num_examples=1)
        return repo.fuse(newer.id, [c.id], validation=ValidationSettings(stale="reject"))

    def fused_twice():
        c = repo.add_contribution({**clean, "w": clean["w"] + 0.0145}, base_version=base.id, contributor="f", task="t",
                                  num_examples=1)
        repo.fuse(base.id, [c.id])
        return repo.fuse(base.id, [c.id])

    def refused_then_fused():
        newer = repo.add_version({**clean, "w": clean["w"] + 2}, model_source="m", parent=base.id)
        c = repo.add_contribution({**clean, "w": clean["w"] + 0.0156}, base_version=base.id, contributor="r", task="t",
                                  num_examples=1)
        try:
            repo.fuse(newer.id, [c.id], validation=ValidationSettings(stale="reject"))
        except Exception:  # noqa: BLE001 (refused, as it should be; now try again)
            pass
        return repo.fuse(newer.id, [c.id])

    def another_runs():
        c = repo.add_contribution({**clean, "w": clean["w"] + 0.0167}, base_version=base.id, contributor="o", task="t",
                                  num_examples=1, run_id="0123456789abcdef")
        return repo.fuse(base.id, [c.id])

    def same_upload_twice():
        for _ in range(2):
            repo.add_contribution({**clean, "w": clean["w"] + 0.0178}, base_version=base.id, contributor="twice",
                                  task="t", num_examples=1)

    pickle_path = root / "body.bin"
    torch.save(clean, pickle_path)
    long_text = "text,label\nfine,a\n\"open,b\n" + "".join(f"row {i},a\n" for i in range(12_000)) + 'end",a\n'
    return [
        ("task file", "malformed csv (extra field)", task_file("a.csv", "text,label\nx,a\ny,b,c\n"), "a.csv"),
        ("task file", "invalid JSON line", task_file("b.jsonl", '{"text": "x", "label": "a"}\n{oops\n'), "line 2"),
        ("task file", "JSON line that is not an object", task_file("c.jsonl", '{"text": "x", "label": "a"}\n3\n'),
         "line 2"),
        ("task file", "empty dataset", task_file("d.csv", "text,label\n"), "empty"),
        ("task file", "missing column", task_file("e.csv", "sentence,label\nx,a\n"), "no column"),
        ("task file", "label not in the label set",
         task_file("f.csv", "text,label\nx,a\ny,zz\n", label_names=["a", "b"]), "row 2"),
        ("task file", "empty label", task_file("g.csv", "text,label\nx,a\ny,\n"), "row 2"),
        ("task file", "empty text", task_file("h.csv", 'text,label\nx,a\n"",b\n'), "row 2"),
        ("task file", "enormous text (unclosed quote)", task_file("i.csv", long_text), "is a quote left open"),
        ("task file", "bytes that are not UTF-8", task_file("j.csv", b"text,label\n\xff\xfe,a\n"), "j.csv"),
        ("task file", "random bytes as parquet", task_file("k.parquet", os.urandom(64)), "k.parquet"),
        ("task file", "missing file", lambda: load_task({"name": "t", "path": root / "nope.csv"}), "does not exist"),
        ("task file", "unsupported suffix", task_file("l.xlsx", "text,label\nx,a\n"), "unsupported file type"),
        ("task file", "JSON array of rows", task_file("m.jsonl", '[{"text": "x", "label": "a"}]\n'), "line 1"),
        ("task file", "tsv with a missing label column", task_file("n.tsv", "text\tclass\nx\ta\n"), "no column"),
        ("task file", "a directory, not a file", lambda: load_task({"name": "t", "path": root}), "library"),
        ("config", "not YAML", config_file("a.yaml", "tasks: [unclosed"), "not valid YAML"),
        ("config", "a list, not a mapping", config_file("b.yaml", "- a\n- b\n"), "mapping"),
        ("config", "unknown key", lambda: parse_config({"tasks": ["bbc_topic"], "loops": {}}, "c.yaml"), "'loops'"),
        ("config", "wrong type", lambda: parse_config({"tasks": ["bbc_topic"], "seed": "zero"}, "d.yaml"), "'seed'"),
        ("config", "out of range", lambda: parse_config({"tasks": ["bbc_topic"], "loop": {"iterations": 0}}, "e"),
         "'loop.iterations'"),
        ("config", "unknown fusion parameter",
         config_file("f.yaml", "tasks: [bbc_topic]\nfusion: {method: ties, params: {densty: 0.5}}\n"), "densty"),
        ("config", "no tasks", lambda: parse_config({}, "g.yaml"), "`tasks` needs at least one task"),
        ("config", "attacker that is not a contributor",
         lambda: parse_config({"tasks": ["bbc_topic"], "attack": {"contributors": ["x"]}}, "h"), "attack"),
        ("config", "binary file", config_file("i.yaml", b"\x00\xff\xfe binary"), "i.yaml"),
        ("config", "missing file", lambda: load_config(root / "absent.yaml"), "does not exist"),
        ("config", "a directory", lambda: load_config(root), "library"),
        ("contribution", "NaN value", contribution(lambda b: b["w"].__setitem__((0, 0), float("nan"))), "non-finite"),
        ("contribution", "Inf value", contribution(lambda b: b["b"].__setitem__(1, float("inf"))), "non-finite"),
        ("contribution", "wrong shape", contribution(lambda b: b.__setitem__("w", torch.zeros(3, 4))), "[3, 4]"),
        ("contribution", "wrong dtype", contribution(lambda b: b.__setitem__("b", torch.zeros(3).half())), "float16"),
        ("contribution", "missing tensor", contribution(lambda b: b.pop("b")), "missing"),
        ("contribution", "unexpected tensor", contribution(lambda b: b.__setitem__("x", torch.zeros(1))), "unexpected"),
        ("contribution", "changed integer buffer", contribution(lambda b: b.__setitem__("ids", torch.ones(3).long())),
         "integer tensor"),
        ("contribution", "update scaled 1000x", contribution(lambda b: b["w"].mul_(1000)), "median"),
        ("contribution", "corrupt file bytes", corrupt_file, "checksum"),
        ("contribution", "stale base, policy reject", stale_refused, "stale"),
        ("lineage", "a contribution fused twice", fused_twice, "was already fused into version"),
        ("lineage", "a refused contribution fused later", refused_then_fused, "was refused"),
        ("lineage", "another run's contribution", another_runs, "which fuses or abandons it itself"),
        ("lineage", "the same upload twice", same_upload_twice, "refused (duplicate)"),
        ("upload", "pickle", lambda: read_upload(pickle_path, set(clean)), "pickle"),
        ("upload", "not a checkpoint", lambda: read_upload(write("z.txt", "hello"), set(clean)),
         "expected a .safetensors"),
        ("upload", "missing file", lambda: read_upload(root / "gone.safetensors", set(clean)), "no such file"),
    ]


# -- admission: what an outside party sends, refused with the rule it breaks ------------------

def _attack_payloads(base: dict) -> list[tuple[str, bytes, dict, int, str]]:
    """(what, payload bytes, encoding, declared examples, the rule that refuses it) against `base`."""
    from safetensors.torch import save

    data = save({k: v.contiguous() for k, v in base.items()})
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    for info in header.values():
        info["data_offsets"] = [0, info["data_offsets"][1] - info["data_offsets"][0]]  # all at the same bytes
    head = json.dumps(header).encode()
    shared = len(head).to_bytes(8, "little") + head + data[8 + size:8 + size + max(
        i["data_offsets"][1] for i in header.values())]
    honest = {k: v + 1e-3 * torch.randn(v.shape, generator=torch.Generator().manual_seed(1)) for k, v in base.items()}
    return [
        ("tensors sharing their bytes", shared, {"kind": "full"}, 10, "format"),
        ("a full body sent as a delta", save({k: v.half() for k, v in base.items()}),
         {"kind": "delta", "dtype": "float16"}, 10, "norm"),
        ("an empty sparse payload", save({}), {"kind": "sparse"}, 10, "no-op"),
        ("the unchanged base", data, {"kind": "full"}, 10, "no-op"),
        ("an update scaled 1000x, alone", save({k: base[k] + 1000 * (honest[k] - base[k]) for k in base}),
         {"kind": "full"}, 10, "norm"),
        ("a trillion declared examples", save(honest), {"kind": "full"}, 10**12, "examples"),
    ]


def _base_body() -> dict:
    return {"w": torch.randn(16, 8, generator=torch.Generator().manual_seed(0)), "b": torch.randn(8)}


def admission_cases(root: Path) -> list[Case]:
    from coldfusion.repository import Repository

    repo = Repository(root / "repo")
    base = _base_body()
    v1 = repo.add_version(base, model_source="m")

    def admit(data, encoding, examples, ref=v1.id, who="mallory"):
        return lambda: repo.add_contribution(data, base_version=ref, contributor=who, task="t",
                                             num_examples=examples, encoding=encoding)

    def twice_two_bases():
        from safetensors.torch import save

        data = save({k: v + 2e-3 for k, v in base.items()})
        c = repo.add_contribution(data, base_version=v1.id, contributor="twice", task="t", num_examples=1)
        v2 = repo.fuse(v1.id, [c.id])
        return repo.add_contribution(data, base_version=v2.id, contributor="twice", task="t", num_examples=1)

    def held_back_base():
        c = repo.add_contribution({k: v + 3e-3 for k, v in base.items()}, base_version=v1.id, contributor="held",
                                  task="t", num_examples=1)
        held = repo.fuse(v1.id, [c.id])
        repo.hold_back(held.id, "scores below its parent on the operator's suite")
        return repo.add_contribution({k: v + 4e-3 for k, v in base.items()}, base_version=held.id,
                                     contributor="held", task="t", num_examples=1)

    cases = [("admission", what, admit(data, encoding, examples), f"refused ({rule})")
             for what, data, encoding, examples, rule in _attack_payloads(base)]
    return cases + [
        ("admission", "the same bytes claiming two bases", twice_two_bases, "refused (duplicate)"),
        ("admission", "a held-back version as its base", held_back_base, "refused (base): version"),
        *[("admission", f"base {ref[:12]!r}", admit(b"", {"kind": "full"}, 1, ref=ref), "refused (base)")
          for ref in ODD_REFS],
    ]


def http_cases(root: Path) -> list[Case]:
    """The service's routes in process (FastAPI's TestClient: the app as served, without a socket)."""
    from fastapi.testclient import TestClient
    from safetensors.torch import save

    from coldfusion.infra.errors import ColdFusionError
    from coldfusion.repository import Repository
    from coldfusion.service.app import create_app
    from coldfusion.service.settings import ServiceSettings
    from coldfusion.service.tokens import ServiceStore

    repo = Repository(root / "repo")
    base = _base_body()
    repo.add_version(base, model_source="m")
    token = ServiceStore(repo.root).issue("mallory")
    client = TestClient(create_app(repo.root, ServiceSettings(fusion={"enabled": False})))

    def judged(response):
        if response.status_code >= 500:
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:300]}")
        if response.status_code >= 400:
            raise ColdFusionError(f"HTTP {response.status_code}: {response.json().get('detail')}")
        return response

    def post(data, encoding, examples, ref="1"):
        return lambda: judged(client.post("/v1/contributors/mallory/contributions", content=data,
                                          params={"base": ref, "task": "t", "examples": examples,
                                                  "encoding": json.dumps(encoding)},
                                          headers={"Authorization": f"Bearer {token}"}))

    cases = [("http", what, post(data, encoding, examples), f"refused ({rule})")
             for what, data, encoding, examples, rule in _attack_payloads(base)]
    honest = save({k: v + 1e-3 for k, v in base.items()})
    return cases + [
        *[("http", f"GET version {ref[:12]!r}", lambda r=ref: judged(client.get(f"/v1/versions/{r}")),
           "a version is 'latest', an id") for ref in ODD_REFS if ref not in ("%", "%5_")],
        *[("http", f"push onto base {ref[:12]!r}", post(honest, {"kind": "full"}, 1, ref=ref), "HTTP 422")
          for ref in ODD_REFS],
    ]


# -- safetensors files: every header the reader must refuse ---------------------------------

def header_bytes(header, data: bytes = bytes(8), length: int | None = None) -> bytes:
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    return (len(head) if length is None else length).to_bytes(8, "little") + head + data


GOOD_ENTRY = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
MALFORMED_SAFETENSORS = {
    "header length 2^62": header_bytes(GOOD_ENTRY, length=2**62),
    "header length 2^40": header_bytes(GOOD_ENTRY, length=2**40),
    "header length past the file": header_bytes(GOOD_ENTRY, length=4096),
    "header is a JSON list": header_bytes([1, 2, 3]),
    "header is a JSON string": header_bytes("w"),
    "header is not JSON": header_bytes(b"{nope"),
    "header is not UTF-8": header_bytes(b"\xff\xfe{}"),
    "entry is a string": header_bytes({"w": "F32"}),
    "entry lacks data_offsets": header_bytes({"w": {"dtype": "F32", "shape": [2]}}),
    "unknown dtype": header_bytes({"w": {**GOOD_ENTRY["w"], "dtype": "F8_E9"}}),
    "negative dimension": header_bytes({"w": {**GOOD_ENTRY["w"], "shape": [-2]}}),
    "float dimension": header_bytes({"w": {**GOOD_ENTRY["w"], "shape": [2.0]}}),
    "shape is a string": header_bytes({"w": {**GOOD_ENTRY["w"], "shape": "2"}}),
    "offsets past the data": header_bytes({"w": {**GOOD_ENTRY["w"], "data_offsets": [0, 800]}}),
    "offsets reversed": header_bytes({"w": {**GOOD_ENTRY["w"], "data_offsets": [8, 0]}}),
    "offsets that do not fit the shape": header_bytes({"w": {**GOOD_ENTRY["w"], "shape": [3]}}),
    "one offset": header_bytes({"w": {**GOOD_ENTRY["w"], "data_offsets": [0]}}),
    "metadata not strings": header_bytes({**GOOD_ENTRY, "__metadata__": {"a": 1}}),
    "shorter than its length field": b"\x01\x02",
    "empty file": b"",
}


def safetensors_cases(root: Path) -> list[Case]:
    from coldfusion.repository.uploads import read_upload

    root.mkdir(parents=True)
    out = []
    for i, (what, data) in enumerate(MALFORMED_SAFETENSORS.items()):
        path = root / f"upload{i}.safetensors"
        path.write_bytes(data)
        out.append(("safetensors", what, lambda p=path: read_upload(p, {"w"}), "not a readable safetensors file"))
    return out


# -- pickles (with --allow-pickle: trusted, and still refused when they are not a state dict) ---

class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo this pickle ran code",))


def pickle_cases(root: Path) -> list[Case]:
    from coldfusion.repository.uploads import read_upload

    root.mkdir(parents=True)
    files = {
        "pickle that runs code": pickle.dumps({"w": _RunsCode()}),
        "not a zip, not a pickle": b"PK\x03\x04 not really a zip",
        "empty file": b"",
        "a list of tensors": None,
        "a dict of strings": None,
    }
    out = []
    for i, (what, data) in enumerate(files.items()):
        path = root / f"upload{i}.bin"
        if what == "a list of tensors":
            torch.save([torch.zeros(2)], path)
        elif what == "a dict of strings":
            torch.save({"w": "zeros"}, path)
        else:
            path.write_bytes(data)
        out.append(("pickle", what, lambda p=path: read_upload(p, {"w"}, allow_pickle=True), path.name))
    return out


# -- model directories given to merge --------------------------------------------------------

def model_directory_cases(root: Path) -> list[Case]:
    from coldfusion.merge.config import load_merge_config
    from coldfusion.merge.run import merge_checkpoints

    root.mkdir(parents=True)
    config = {"architectures": ["BertModel"], "model_type": "bert"}

    def model(name: str, files: dict[str, bytes | str | None]) -> Path:
        path = root / name
        path.mkdir()
        for file_name, content in files.items():
            if content is None:
                save_file({"w": torch.zeros(2)}, path / file_name)
            else:
                (path / file_name).write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    def merge(path: Path, **extra):
        cfg = root / f"{path.name}.yaml"
        cfg.write_text(yaml.safe_dump({"models": [{"model": str(path)}], "output": str(root / f"{path.name}-out"),
                                       **extra}))
        return lambda: merge_checkpoints(load_merge_config(cfg))

    sharded = {"config.json": json.dumps(config), "model.safetensors.index.json": '{"weight_map": {"w": "../x"}}'}
    return [
        ("model directory", "no config.json", merge(model("a", {"model.safetensors": None})), "no config.json"),
        ("model directory", "config.json is not JSON",
         merge(model("b", {"config.json": "{oops", "model.safetensors": None})), "config.json"),
        ("model directory", "no weights", merge(model("c", {"config.json": json.dumps(config)})),
         "no model.safetensors"),
        ("model directory", "only a pickle, not allowed",
         merge(model("d", {"config.json": json.dumps(config), "pytorch_model.bin": b"x"})), "allow_pickle"),
        ("model directory", "weights that are not safetensors",
         merge(model("e", {"config.json": json.dumps(config), "model.safetensors": b"garbage!garbage!"})),
         "not a readable safetensors file"),
        ("model directory", "shard index naming a file outside", merge(model("f", sharded)), "f"),
        ("model directory", "not a directory, not a hub id", merge(root / "nowhere"), "could not be fetched"),
    ]


# -- configs of every command -------------------------------------------------------------

def config_cases(root: Path) -> list[Case]:
    from coldfusion.collab.config import load_config
    from coldfusion.evaluation import load_eval_config
    from coldfusion.merge.config import load_merge_config
    from coldfusion.multitask.config import load_multitask_config
    from coldfusion.selection.settings import load_selection_settings

    root.mkdir(parents=True)
    counter = iter(range(10_000))

    def via(loader, data) -> Callable[[], object]:
        path = root / f"c{next(counter)}.yaml"
        path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
        return lambda: loader(path)

    run = lambda **kw: {"tasks": ["bbc_topic"], **kw}  # noqa: E731
    body = [{"name": "b", "model": "default"}]
    merge = lambda **kw: {"models": [{"model": "default"}], "output": str(root / "merged"), **kw}  # noqa: E731
    return [
        ("run config", "run name that leaves output_dir", via(load_config, run(name="../../escaped")),
         "cannot name a file or directory"),
        ("run config", "task name that leaves heads/", via(load_config, {"tasks": [{"name": "../e", "path": "t.csv"}]}),
         "cannot name a file or directory"),
        ("run config", "hidden task name",
         via(load_config, {"tasks": [{"name": ".h", "path": "t.csv"}]}), "cannot name a file or directory"),
        ("run config", "TIES density -0.3",
         via(load_config, run(fusion={"method": "ties", "params": {"density": -0.3}})), "greater than 0"),
        ("run config", "TIES density 1.5", via(load_config, run(fusion={"method": "ties", "params": {"density": 1.5}})),
         "less than or equal to 1"),
        ("run config", "DARE density 0", via(load_config, run(fusion={"method": "dare", "params": {"density": 0}})),
         "greater than 0"),
        ("run config", "DARE unknown variant",
         via(load_config, run(fusion={"method": "dare", "params": {"variant": "magic"}})), "variant"),
        ("run config", "trim 0.5", via(load_config, run(fusion={"method": "trimmed_mean", "params": {"trim": 0.5}})),
         "less than 0.5"),
        ("run config", "infinite scale",
         via(load_config, run(fusion={"method": "task_arithmetic", "params": {"scale": float("inf")}})),
         "finite"),
        ("run config", "unknown fusion method", via(load_config, run(fusion={"method": "avrage"})), "avrage"),
        ("run config", "negative learning rate", via(load_config, run(finetune={"lr": -1})), "'finetune.lr'"),
        ("run config", "unknown pooling", via(load_config, run(pooling="max")), "'pooling'"),
        ("run config", "unknown engine", via(load_config, run(engine="ray")), "'engine'"),
        ("run config", "deployment with task data",
         via(load_config, run(engine="flower", flower={"mode": "deployment"})), "contributors"),
        ("run config", "repeated task names", via(load_config, {"tasks": ["bbc_topic", "bbc_topic"]}), "repeat"),
        ("run config", "contributor name with a slash",
         via(load_config, {"engine": "flower", "flower": {"mode": "deployment"}, "contributors": ["a/b"]}),
         "cannot name a file or directory"),
        ("evaluate config", "no bodies", via(load_eval_config, {"tasks": ["bbc_topic"]}), "'bodies'"),
        ("evaluate config", "name that leaves output_dir",
         via(load_eval_config, {"name": "../x", "bodies": body, "tasks": ["bbc_topic"]}), "'name'"),
        ("evaluate config", "unknown protocol",
         via(load_eval_config, {"bodies": body, "tasks": ["bbc_topic"], "protocols": ["zero_shot"]}), "protocols"),
        ("evaluate config", "not YAML", via(load_eval_config, "bodies: [unclosed"), "not valid YAML"),
        ("merge config", "no models", via(load_merge_config, {"models": [], "output": "x"}), "'models'"),
        ("merge config", "negative weight",
         via(load_merge_config, merge(models=[{"model": "default", "weight": -1}])), "weight"),
        ("merge config", "unknown heads policy", via(load_merge_config, merge(heads="average")), "'heads'"),
        ("merge config", "TIES density 2", via(load_merge_config, merge(method="ties", params={"density": 2})),
         "less than or equal to 1"),
        ("multitask config", "no tasks", via(load_multitask_config, {"name": "m"}), "'tasks'"),
        ("multitask config", "name that leaves output_dir",
         via(load_multitask_config, {"name": "/abs", "tasks": ["bbc_topic"]}), "'name'"),
        ("multitask config", "unknown sampler",
         via(load_multitask_config, {"tasks": ["bbc_topic"], "multitask": {"sampler": "lottery"}}), "sampler"),
        ("selection settings", "unknown key", via(load_selection_settings, {"seedz": [0]}), "seedz"),
        ("selection settings", "no seeds", via(load_selection_settings, {"seeds": []}), "'seeds'"),
    ]


# -- tasks from the hub (a local directory in the hub's layout, through load_dataset) ------------

def hub_cases(root: Path) -> list[Case]:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from coldfusion.tasks import load_task

    root.mkdir(parents=True)
    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"])})
    schema = datasets.Dataset.from_dict({"sentence": [], "label": []}, features=features).data.table.schema

    def hub(name: str, splits: dict[str, list[int]]):
        (root / name / "data").mkdir(parents=True)
        for split, labels in splits.items():
            table = pa.table({"sentence": [f"{split} {i}" for i in range(len(labels))], "label": labels},
                             schema=schema)
            pq.write_table(table, root / name / "data" / f"{split}-00000-of-00001.parquet")
        return lambda: load_task({"name": "t", "hf_dataset": str(root / name), "text_column": "sentence"})

    return [
        ("hub dataset", "partly unlabelled split (-1)", hub("a", {"train": [0, 1] * 5, "test": [0, -1, 1]}),
         "no label (-1)"),
        ("hub dataset", "label outside the classes", hub("b", {"train": [0, 1, 7, 1]}), "label 7 is not one of"),
        ("hub dataset", "no train split", hub("c", {"test": [0, 1]}), "no train split"),
        ("hub dataset", "wrong text column",
         lambda: hub("d", {"train": [0, 1] * 5}) and load_task({"name": "t", "hf_dataset": str(root / "d")}),
         "no column"),
        ("hub dataset", "unreachable id", lambda: load_task({"name": "t", "hf_dataset": str(root / "none")}),
         "could not load the Hugging Face dataset"),
    ]


def task_cases(root: Path) -> list[Case]:
    from coldfusion.tasks import load_task

    root.mkdir(parents=True)
    return [
        ("task spec", "unknown built-in task", lambda: load_task("imdb"), "unknown task 'imdb'"),
        ("task spec", "two sources", lambda: load_task({"name": "t", "path": "a.csv", "hf_dataset": "glue"}),
         "only one of"),
        ("task spec", "name with a separator", lambda: load_task({"name": "a/b", "path": "a.csv"}),
         "cannot name a file or directory"),
    ]


# -- the command line: names, ids and options ---------------------------------------------

def command_line_cases(root: Path) -> list[Case]:
    from coldfusion.cli import app
    from coldfusion.repository import Repository

    root.mkdir(parents=True)
    runner = CliRunner()
    repo = Repository(root / "repo")
    repo.add_version({"w": torch.full((2,), 0.001)}, model_source="m")
    upload = root / "body.safetensors"
    save_file({"w": torch.ones(2)}, upload)  # a thousandfold the base: refused by the norm bound
    (root / "full").mkdir()
    (root / "full" / "keep.txt").write_text("mine")
    (root / "garbage").mkdir()
    (root / "garbage" / "index.sqlite").write_bytes(os.urandom(4096))
    cli = lambda *args: lambda: runner.invoke(app, [str(a) for a in args])  # noqa: E731
    contribute = ("contribute", repo.root, upload, "--contributor", "x", "--task", "t")
    return [
        ("command line", "contribute: examples 0", cli(*contribute, "--base", 1, "--examples", 0), "--examples"),
        ("command line", "contribute: unknown base", cli(*contribute, "--base", 9, "--examples", 1), "no version 9"),
        ("command line", "contribute: base as text", cli(*contribute, "--base", "zz", "--examples", 1),
         "a version is 'latest', an id"),
        *[("command line", f"contribute: base {ref[:12]!r}", cli(*contribute, "--base", ref, "--examples", 1),
           "a version is 'latest', an id") for ref in ODD_REFS],
        *[("command line", f"export: version {ref[:12]!r}", cli("export", repo.root, ref, root / "odd"),
           "a version is 'latest', an id") for ref in ODD_REFS],
        ("command line", "contribute: an update scaled 1000x", cli(*contribute, "--base", 1, "--examples", 1),
         "refused (norm)"),
        ("command line", "contribute: no repository", cli("contribute", root / "none", upload, "--base", 1,
                                                          "--contributor", "x", "--task", "t", "--examples", 1),
         "no repository at"),
        ("command line", "fuse: ids that are not numbers", cli("fuse", repo.root, "--contributions", "a,b"),
         "expected comma-separated ids"),
        ("command line", "fuse: a parameter that is not YAML", cli("fuse", repo.root, "--method", "ties", "--param",
                                                                   "density=[0.5"), "density"),
        ("command line", "fuse: unknown stale policy", cli("fuse", repo.root, "--stale", "sometimes"), "stale"),
        ("command line", "fuse: unknown contribution", cli("fuse", repo.root, "--contributions", "42"),
         "no contribution 42"),
        ("command line", "fuse: parameter without a value", cli("fuse", repo.root, "--param", "density"),
         "expected KEY=VALUE"),
        ("command line", "fuse: unknown method", cli("fuse", repo.root, "--method", "mean"), "unknown fusion method"),
        ("command line", "fuse: nothing waiting", cli("fuse", repo.root), "no contributions waiting"),
        ("command line", "export: unknown version", cli("export", repo.root, 7, root / "out"), "no version 7"),
        ("command line", "export: into a directory with files", cli("export", repo.root, "latest", root / "full"),
         "exists and is not empty"),
        ("command line", "versions: not a repository", cli("versions", root / "full"), "no repository at"),
        ("command line", "verify: an index of random bytes", cli("verify", root / "garbage"),
         "cannot be opened as a repository index"),
        ("command line", "contribute: to an index of random bytes",
         cli("contribute", root / "garbage", upload, "--base", 1, "--contributor", "x", "--task", "t",
             "--examples", 1), "cannot be opened as a repository index"),
        ("command line", "run: no such config", cli("run", root / "absent.yaml"), "does not exist"),
        ("command line", "run: a config with markup-like text", cli("run", _write(root / "m.yaml", "tasks: [x\n")),
         "[x"),
        ("command line", "adopt-model: not a model directory", cli("adopt-model", repo.root, root / "full"),
         "no config.json"),
        ("command line", "rank: unknown target", cli("rank", "default", "--target", "no_such_task"),
         "unknown task 'no_such_task'"),
    ]


ODD_REFS = ["²", "v²", "9" * 5000, "%", "_", "%5_", "٣"]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# -- generated with hypothesis -----------------------------------------------------------------

_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def generated_cases(root: Path) -> list[Case]:
    from coldfusion.collab.config import load_config, parse_config
    from coldfusion.repository.uploads import read_upload

    root.mkdir(parents=True)
    out = []
    # safetensors headers: a JSON object whose one tensor entry is broken in a random way
    broken_entry = st.one_of(
        st.fixed_dictionaries({"dtype": st.text(max_size=6).filter(lambda d: d not in ("F32", "BF16", "F16")),
                               "shape": st.just([2]), "data_offsets": st.just([0, 8])}),
        st.fixed_dictionaries({"dtype": st.just("F32"), "shape": st.lists(st.integers(-5, 5), max_size=3),
                               "data_offsets": st.lists(st.integers(-10, 10**6), min_size=2, max_size=2)})
        .filter(lambda e: not (e["data_offsets"] == [0, 8] and e["shape"] in ([2], [1, 2], [2, 1], [1, 1, 2]))),
        st.one_of(st.integers(), st.text(max_size=5), st.lists(st.integers(), max_size=3), st.none()),
    )
    for i, entry in enumerate(generated(broken_entry, 25)):
        path = root / f"h{i}.safetensors"
        path.write_bytes(header_bytes({"w": entry}))
        out.append(("safetensors (generated)", f"tensor entry {json.dumps(entry)[:60]}",
                    lambda p=path: read_upload(p, {"w"}), "not a readable safetensors file"))
    # names that would leave their directory, or hide in it
    bad_names = st.text(min_size=0, max_size=12).filter(lambda n: not _SAFE_NAME.fullmatch(n))
    for name in generated(bad_names, 15):
        out.append(("run config (generated)", f"run name {name!r}",
                    lambda n=name: parse_config({"name": n, "tasks": ["bbc_topic"]}, "generated.yaml"), "'name'"))
    # run configs with one numeric setting set out of its range or to the wrong type
    fields = {("loop", "iterations"): st.integers(max_value=0), ("loop", "validation_examples"): st.integers(-9, 0),
              ("finetune", "batch_size"): st.integers(max_value=0), ("finetune", "lr"): st.floats(max_value=0),
              ("finetune", "warmup_ratio"): st.floats(min_value=1.01, allow_infinity=False),
              ("evaluation", "test_examples"): st.integers(max_value=0),
              ("fusion", "statistics_examples"): st.text(min_size=1, max_size=4).filter(lambda t: not t.isdigit())}
    field_and_value = st.sampled_from(sorted(fields)).flatmap(lambda f: st.tuples(st.just(f), fields[f]))
    for i, ((section, key), value) in enumerate(generated(field_and_value, 15)):
        path = root / f"run{i}.yaml"
        path.write_text(yaml.safe_dump({"tasks": ["bbc_topic"], section: {key: value}}))
        out.append(("run config (generated)", f"{section}.{key} = {value!r}", lambda p=path: load_config(p),
                    f"'{section}.{key}'"))
    return out


def clean_up(root: Path) -> None:
    shutil.rmtree(root, ignore_errors=True)
