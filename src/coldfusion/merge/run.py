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

import yaml

from coldfusion import __version__
from coldfusion.fusion import get_operator
from coldfusion.fusion.streaming import fuse_stream, output_layout
from coldfusion.infra.errors import ColdFusionError
from coldfusion.io.checkpoint import staged_directory
from coldfusion.io.hf_checkpoint import body_layout, open_body, read_config, weight_files
from coldfusion.io.model_files import TOKENIZER_FILES, sha256, start_hashing
from coldfusion.io.tensorfile import SafetensorsReader, SafetensorsWriter
from coldfusion.merge.config import MergeConfig
from coldfusion.models.names import card_name, portable_name, resolve_model_source


def local_model_dir(model: str) -> Path:
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

    dirs = [local_model_dir(m.model) for m in config.models]
    base_dir = local_model_dir(config.base_model) if config.base_model else None
    with ExitStack() as stack, tempfile.TemporaryDirectory() as scratch:
        files = {d: weight_files(d, config.allow_pickle, Path(scratch)) for d in [*dirs, base_dir] if d}
        body_keys, body_class = body_layout([d for d in [base_dir, *dirs] if d], files)
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
        arch = read_config(base_dir or dirs[0])
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
