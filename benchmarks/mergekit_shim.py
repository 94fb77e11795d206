"""Run `mergekit-yaml` with one compatibility fix, for the fusion benchmark only.

mergekit 0.1.5 cannot plan any BERT-family merge: for optional weights it evaluates
`[w_in.name] + (w_in.aliases or [])` where `aliases` is a tuple (TypeError, plan.py).
This shim hands the planner lists instead of tuples and changes nothing else; it runs
inside mergekit's own environment:  benchmarks/.env/bin/python benchmarks/mergekit_shim.py ARGS...
"""

import sys

import mergekit.plan
from mergekit.scripts.run_yaml import main

_plan_tensor = mergekit.plan.MergePlanner.plan_tensor


def plan_tensor(self, weight, weights_in, *args, **kwargs):
    weights_in = [w.model_copy(update={"aliases": list(w.aliases)}) if w.aliases else w for w in weights_in]
    return _plan_tensor(self, weight, weights_in, *args, **kwargs)


mergekit.plan.MergePlanner.plan_tensor = plan_tensor

if __name__ == "__main__":
    sys.argv[0] = "mergekit-yaml"
    main()
