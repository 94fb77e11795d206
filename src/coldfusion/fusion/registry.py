"""Fusion operators by name.

An operator fuses one named tensor at a time: it receives the contributed tensors as a
lazy sequence (each read from disk when indexed), their weights, the base tensor when it
needs one, and its own keyword parameters (validated against its signature). Writing a
new operator = one module with one registered function.

Most operators act entry by entry (`elementwise=True`): the engine then hands them flat
slices of a few hundred thousand entries of every model at a time (`offset` is where the
slice starts), so memory stays flat however many models and however large the tensor.
An operator that needs a whole-tensor quantity of each model first (TIES: the magnitude
cut-off of each task vector) names a `prepare(tensors, base, workers, **params)`
function; the engine calls it with whole tensors (it may use `workers` threads) and
passes its result to every slice as `prepared`. When all models' tensors fit in
`streaming.HOLD_BYTES`, it passes them whole instead, without `prepared` (one read of
each model). For a `compute_bound` operator the engine fuses several slices at once, one
per thread, and one given whole tensors that takes `workers` may use that many threads
itself. Parameters are typed in the function's signature, ranges as pydantic
constraints (`density: Annotated[float, Field(gt=0, le=1)] = 0.2`): a config is checked
against them before any training starts. An operator that scales
each model by the size of its whole update (norm clipping) sets `needs_norms` and gets
`norms`, each model's ||m_i - b|| over all its tensors.
"""

import inspect
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
from pydantic import ConfigDict, ValidationError, create_model

from coldfusion.infra.errors import ColdFusionError

FuseFn = Callable[..., torch.Tensor]

# Arguments every operator may receive from the engine; everything else is a parameter.
ENGINE_ARGUMENTS = ("tensors", "weights", "base", "name", "stats", "offset", "prepared", "norms", "workers")
# Statistics an operator may need from each contributor ("fisher": diagonal Fisher of
# every tensor; "gram": X^T X of the inputs of every linear layer, keyed by its weight).
STATISTICS = ("fisher", "gram")
# Parameter names as other tools spell them -> ours.
ALIASES = {"lambda": "scale"}


@dataclass(frozen=True)
class Operator:
    name: str
    fuse: FuseFn  # fuse(tensors: Sequence[Tensor], weights: Tensor, base: Tensor | None, **params)
    weighting: str  # "uniform" or "examples": where the default weights come from
    needs_base: bool
    needs_stats: str | None
    doc: str
    elementwise: bool = False  # fusing any slice of the flattened tensors on its own gives that slice
    prepare: Callable | None = None  # prepare(tensors, base, workers, **params): whole-tensor facts per model
    needs_norms: bool = False  # gets `norms`: each model's delta norm ||m_i - b|| over all its tensors
    # Fusing costs far more than reading (TIES): the engine fuses on every thread torch may
    # use. Otherwise on one, which is as fast for a memory-bound sum and leaves the caller a core.
    compute_bound: bool = False

    # Cached: the engine asks once per tensor, and a signature never changes.
    @cached_property
    def parameters(self) -> dict[str, object]:
        """The operator's own parameters and their defaults."""
        sig = inspect.signature(self.fuse).parameters
        return {k: p.default for k, p in sig.items() if k not in ENGINE_ARGUMENTS}

    @cached_property
    def arguments(self) -> frozenset[str]:
        """The engine arguments the operator takes (e.g. `name` to seed its randomness)."""
        return frozenset(inspect.signature(self.fuse).parameters) & set(ENGINE_ARGUMENTS)

    def prepare_params(self, params: dict) -> dict:
        """The parameters that `prepare` takes, defaults filled in from the operator's."""
        wanted = inspect.signature(self.prepare).parameters
        return {k: v for k, v in {**self.parameters, **params}.items() if k in wanted}

    @cached_property
    def _params_model(self):
        """A pydantic model of the parameters: their types, ranges and defaults."""
        hints = typing.get_type_hints(self.fuse, include_extras=True)
        fields = {k: (hints.get(k, typing.Any), default) for k, default in self.parameters.items()}
        return create_model(f"{self.name}_params", __config__=ConfigDict(extra="forbid", allow_inf_nan=False,
                                                                          strict=False), **fields)

    def check_params(self, params: dict) -> dict:
        """The parameters under their canonical names, checked against the operator's types
        and ranges; an unknown name or a value out of range is an error that says what is valid."""
        canonical = {ALIASES.get(k, k): v for k, v in params.items()}
        unknown = sorted(set(canonical) - set(self.parameters))
        if unknown:
            valid = ", ".join(f"{k} (default {v})" for k, v in self.parameters.items()) or "none"
            raise ColdFusionError(f"fusion method '{self.name}' has no parameter {unknown}; its parameters: {valid}")
        try:
            checked = self._params_model.model_validate(canonical)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']} (got {e.get('input')!r})"
                                 for e in exc.errors())
            raise ColdFusionError(f"fusion method '{self.name}': {problems}") from None
        return {k: getattr(checked, k) for k in canonical}


REGISTRY: dict[str, Operator] = {}


def register(name: str, *, weighting: str = "uniform", needs_base: bool = False, needs_stats: str | None = None,
             elementwise: bool = False, prepare: Callable | None = None, needs_norms: bool = False,
             compute_bound: bool = False):
    assert needs_stats in (None, *STATISTICS), needs_stats
    assert prepare is None or elementwise, "prepare only makes sense for an elementwise operator"
    assert needs_base or not needs_norms, "a delta norm is measured from the base"

    def wrap(fn: FuseFn) -> FuseFn:
        doc = (fn.__doc__ or "").strip().split("\n")[0]
        REGISTRY[name] = Operator(name, fn, weighting, needs_base, needs_stats, doc, elementwise, prepare, needs_norms,
                                  compute_bound)
        return fn

    return wrap


def get_operator(name: str) -> Operator:
    if name not in REGISTRY:
        raise ColdFusionError(f"unknown fusion method '{name}'; available: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def weighted_sum(tensors: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """sum_i w_i t_i / sum_i w_i in float32, reading one tensor at a time."""
    from coldfusion.fusion.task_vectors import each_float

    total = None
    for w, t in zip(weights.tolist(), each_float(tensors), strict=True):
        if total is None:
            total = t * w  # a new tensor: the inputs are never modified
        else:
            total.add_(t, alpha=w)  # no temporary
    return total.div_(float(weights.sum()))
