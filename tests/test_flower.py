"""ColD Fusion on Flower: the same loop, with contributors as Flower ClientApps."""

import json

import pandas as pd
import pytest
import torch

from conftest import make_sentiment_rows
from test_loop import final_body, tiny_config

flwr = pytest.importorskip("flwr")

from coldfusion.collab import run_cold_fusion  # noqa: E402
from coldfusion.collab.flower.simulation import run_on_simulation  # noqa: E402


@pytest.fixture(scope="module")
def three_tasks(toy_task_files, tmp_path_factory):
    """The two toy tasks plus a third contributor (sentiment in other words)."""
    root = tmp_path_factory.mktemp("third-task")
    pd.DataFrame(make_sentiment_rows(300, seed=3, words_pos=["bright", "warm", "sweet"],
                                     words_neg=["grim", "cold", "sour"])).to_csv(root / "mood.csv", index=False)
    return {**toy_task_files, "mood": root / "mood.csv"}


def test_simulation_fuses_what_the_local_engine_fuses(tiny_model_dir, three_tasks, tmp_path):
    local = run_cold_fusion(tiny_config(tiny_model_dir, three_tasks, tmp_path / "local"))
    config = tiny_config(tiny_model_dir, three_tasks, tmp_path / "flower").model_copy(update={"engine": "flower"})
    flower = run_on_simulation(config)
    a, b = final_body(local), final_body(flower)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), k
    rows = [json.loads(line) for line in (flower / "results.jsonl").read_text().splitlines()]
    fusions = [r for r in rows if r["kind"] == "fusion"]
    assert [f["contributors"] for f in fusions] == [list(three_tasks)] * 2 and all(not f["missing"] for f in fusions)
