"""`coldfusion merge`: fuse finetuned checkpoints a practitioner already has.

Inputs are Hugging Face model directories of one architecture (BERT, RoBERTa, MiniLM,
...), with or without classification heads, whose heads may differ in shape. Only the
encoder body is fused; heads are dropped, or the base model's head is kept. The output
is a directory transformers loads, with a model card recording the base model, the
method, its parameters and the checksums of every input.
"""

import json
import shutil
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from coldfusion import __version__
from coldfusion.checkpoint import save_tensors, staged_directory
from coldfusion.configfile import format_validation_error, read_yaml_mapping
from coldfusion.errors import ColdFusionError
from coldfusion.fusion import get_operator
from coldfusion.fusion.streaming import fuse_stream, output_layout
from coldfusion.inputs import TOKENIZER_FILES, safetensors_files, sha256, start_hashing
from coldfusion.model_names import card_name, portable_name, resolve_model_source
from coldfusion.tensorfile import SafetensorsReader, SafetensorsWriter


class MergeInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="a model directory (or hub id)")
    weight: float = Field(1.0, ge=0)


class MergeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: str = "average"
    params: dict = Field(default_factory=dict)
    base_model: str | None = Field(None, description="needed by task-vector methods and by heads: keep_base")
    models: list[MergeInput] = Field(min_length=1)
    heads: Literal["drop", "keep_base"] = "drop"
    output: Path
    overwrite: bool = False
    allow_pickle: bool = Field(False, description="UNSAFE: also read pytorch_model.bin (pickle can run code)")


def load_merge_config(path: Path) -> MergeConfig:
    data = read_yaml_mapping(path)
    try:
        config = MergeConfig.model_validate(data)
        get_operator(config.method).check_params(config.params)
    except ValidationError as exc:
        raise ColdFusionError(format_validation_error(exc, str(path))) from None
    except ColdFusionError as exc:
        raise ColdFusionError(f"{path}: {exc}") from None
    return config


def _local_dir(model: str) -> Path:
    """A model directory: 'default' is the bundled MiniLM, a directory is itself, else a hub id."""
    path = Path(resolve_model_source(model))
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))
    except Exception as exc:
        raise ColdFusionError(f"'{model}' is not a local directory and could not be fetched from the hub ({exc}); "
                              "without network access give the path of a saved model") from exc


def pickle_to_safetensors(pickle: Path, scratch: Path) -> Path:
    """A trusted pickled state dict, loaded with `weights_only` and saved as safetensors in `scratch`."""
    try:
        loaded = torch.load(pickle, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 (UnpicklingError, a corrupt zip, an unsafe global: all a refusal)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ColdFusionError(f"{pickle}: refused: not a plain state dict that loads with weights_only "
                              f"({first[:300]})") from None
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ColdFusionError(f"{pickle}: expected a dict of tensors (a state dict)")
    converted = scratch / f"{len(list(scratch.iterdir()))}.safetensors"
    save_tensors(converted, loaded)
    return converted


def weight_files(model_dir: Path, allow_pickle: bool, scratch: Path) -> list[Path]:
    """The safetensors files of a checkpoint (sharded or not); a pickle only when allowed."""
    files = safetensors_files(model_dir)
    if files:
        return files
    pickle = model_dir / "pytorch_model.bin"
    if pickle.exists():
        if not allow_pickle:
            raise ColdFusionError(f"{model_dir} has only pytorch_model.bin, a pickle that can run code when loaded; "
                                  "convert it to safetensors, or set `allow_pickle: true` if you trust its source")
        return [pickle_to_safetensors(pickle, scratch)]
    raise ColdFusionError(f"{model_dir} has no model.safetensors (nor shards): is it a model directory?")


def _config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not path.exists():
        raise ColdFusionError(f"{model_dir} has no config.json: is it a model directory?")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ColdFusionError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ColdFusionError(f"{path}: a model config is a JSON object, not a {type(config).__name__}")
    return config


def _is_plain_encoder(config: dict) -> bool:
    """Saved by AutoModel (BertModel, RobertaModel, ...) rather than a task model (...ForX)."""
    archs = config.get("architectures") or []
    return len(archs) == 1 and archs[0].endswith("Model") and "For" not in archs[0]


def _body_layout(dirs: list[Path], files: dict[Path, list[Path]]) -> tuple[set[str], str]:
    """The body's tensor names and class name.

    Read from the first plain-encoder checkpoint among the models when there is one (no
    modeling code imported: that import is most of a merge's start-up time); otherwise
    from the architecture transformers builds for the config, on the meta device.
    """
    for d in dirs:
        config = _config(d)
        if _is_plain_encoder(config):
            with SafetensorsReader(files[d]) as reader:
                return reader.keys(), config["architectures"][0]
    from transformers import AutoConfig, AutoModel  # only here: the import costs seconds

    with torch.device("meta"):  # the layout only: no memory, no initialisation
        body = AutoModel.from_config(AutoConfig.from_pretrained(dirs[0]))
    return set(body.state_dict()), type(body).__name__


def open_body(files: list[Path], body_keys: set[str], label: str) -> SafetensorsReader:
    """Read a checkpoint as a body: with no prefix, or the one that uncovers the most body
    tensors (a classifier stores its body under "bert.", "roberta.", ...)."""
    with SafetensorsReader(files, label=label) as raw:
        prefixes = [""] + sorted({k.split(".", 1)[0] + "." for k in raw.keys() if "." in k})
    best = max(prefixes, key=lambda p: len({k[len(p):] for k in raw.keys() if k.startswith(p)} & body_keys))
    reader = SafetensorsReader(files, best, label)
    if not reader.keys() & body_keys:
        reader.close()
        raise ColdFusionError(f"{label} has none of the body tensors of this architecture")
    return reader


def merge_checkpoints(config: MergeConfig) -> Path:
    """Fuse the bodies of `config.models`; write a transformers directory with a model card."""
    op = get_operator(config.method)
    if op.needs_stats:
        raise ColdFusionError(f"'{config.method}' needs statistics computed on each model's training data, which "
                              "plain checkpoints do not carry; use it inside `coldfusion run`")
    if (op.needs_base or config.heads == "keep_base") and config.base_model is None:
        raise ColdFusionError(f"`base_model` is required for method '{config.method}' / heads '{config.heads}'")
    out = Path(config.output)
    if out.exists() and not config.overwrite:
        raise ColdFusionError(f"output {out} exists; choose another `output` or set `overwrite: true`")

    dirs = [_local_dir(m.model) for m in config.models]
    base_dir = _local_dir(config.base_model) if config.base_model else None
    with ExitStack() as stack, tempfile.TemporaryDirectory() as scratch:
        files = {d: weight_files(d, config.allow_pickle, Path(scratch)) for d in [*dirs, base_dir] if d}
        body_keys, body_class = _body_layout([d for d in [base_dir, *dirs] if d], files)
        start_hashing([f for d in dirs for f in files[d]])  # for the model card, while the fusion runs
        body_of = lambda d: stack.enter_context(open_body(files[d], body_keys, str(d)))  # noqa: E731
        readers = [body_of(d) for d in dirs]
        base = body_of(base_dir) if base_dir else None
        common = set.intersection(*(r.keys() & body_keys for r in readers))
        if op.needs_base and common - base.keys():
            raise ColdFusionError(f"base model {base_dir} lacks body tensors {sorted(common - base.keys())[:5]} "
                                  "that every input has")
        missing = body_keys - common  # e.g. the pooler, absent from RoBERTa classifiers
        if missing and (base is None or not missing <= base.keys()):
            raise ColdFusionError(f"body tensors {sorted(missing)[:5]} are not in every input; give a "
                                  "`base_model` that has them, to copy them from")
        fused = fuse_stream(readers, config.method, [m.weight for m in config.models], base=base, names=common,
                            **config.params)  # checks the arguments now, fuses while being written
        # (key in the output, source reader, key there) of every tensor, in the order they are written
        plan = [(k, None, k) for k in output_layout(readers, common)] + [(k, base, k) for k in sorted(missing)]
        arch = _config(base_dir or dirs[0])
        if config.heads == "keep_base":  # the base's own checkpoint, its body replaced
            raw = stack.enter_context(SafetensorsReader(files[base_dir], label=str(base_dir)))
            head = sorted(k for k in raw.keys() if not k.startswith(base.prefix) and k not in body_keys)
            if not base.prefix or not head:
                raise ColdFusionError(f"base model {base_dir} has no head to keep (it is a plain encoder); "
                                      "use `heads: drop`")
            plan = [(base.prefix + k, src, name) for k, src, name in plan] + [(k, raw, k) for k in head]
        else:  # a plain encoder that AutoModel loads
            arch = {**arch, "architectures": [body_class]}
        layout = {key: (src or readers[0]).layout(name) for key, src, name in plan}
        with staged_directory(out) as tmp:
            (tmp / "config.json").write_text(json.dumps(arch, indent=2, sort_keys=True) + "\n")
            with SafetensorsWriter(tmp / "model.safetensors", layout, metadata={"format": "pt"}) as writer:
                fused_key = {name: key for key, src, name in plan if src is None}
                for name, start, values in fused:
                    writer.write(fused_key[name], start, values)
                for key, src, name in plan:
                    if src is not None:
                        writer.write(key, 0, src.read(name))
                writer.commit()
            for name in TOKENIZER_FILES:
                if ((base_dir or dirs[0]) / name).exists():
                    shutil.copy2((base_dir or dirs[0]) / name, tmp / name)
            inputs = [{"model": portable_name(m.model), "weight": m.weight,
                       "sha256": {f.name: sha256(f) for f in files[d]}}
                      for m, d in zip(config.models, dirs, strict=True)]
            record = {"coldfusion_version": __version__, "method": config.method, "params": config.params,
                      "base_model": card_name(config.base_model) if config.base_model else None,
                      "base_sha256": {f.name: sha256(f) for f in files[base_dir]} if base_dir else None,
                      "heads": config.heads, "inputs": inputs, "copied_from_base": sorted(missing)}
            (tmp / "coldfusion_merge.json").write_text(json.dumps(record, indent=2))
            (tmp / "README.md").write_text(model_card(record))
    return out



def model_card(record: dict) -> str:
    front = {**({"base_model": record["base_model"]} if record["base_model"] else {}), "library_name": "transformers",
             "tags": ["coldfusion", "merge", record["method"]]}
    rows = "\n".join(f"| {i['model']} | {i['weight']} | " + ", ".join(f"`{n}` {h}" for n, h in i["sha256"].items())
                     + " |" for i in record["inputs"])
    copied = ", ".join(record["copied_from_base"]) or "none"
    base = "" if not record["base_sha256"] else (
        f"Base model `{record['base_model']}`, weight files: "
        + ", ".join(f"`{n}` {h}" for n, h in record["base_sha256"].items()) + ".\n")
    return (f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n\n# Merged encoder\n\n"
            f"Fused with [coldfusion](https://pypi.org/project/coldfusion/) {record['coldfusion_version']} `merge`: "
            f"method `{record['method']}`, "
            f"parameters `{json.dumps(record['params'])}`, heads `{record['heads']}`.\n"
            f"Only the encoder body was fused. Body tensors copied from the base (not in every input): {copied}.\n"
            f"{base}\n"
            f"| input | weight | sha256 of its weight files |\n|---|---|---|\n{rows}\n")
