"""Every bad input of the reliability benchmark's catalogue (benchmarks/bad_inputs.py) is
refused with a message that says what was wrong: none crashes, none is accepted."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bad_inputs import cases, judge  # noqa: E402


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    return cases(tmp_path_factory.mktemp("bad-inputs"))


def test_every_bad_input_is_refused_clearly(catalogue):
    assert len(catalogue) >= 100
    outcomes = [(kind, what, *judge(action, expected)) for kind, what, action, expected in catalogue]
    wrong = [f"{kind} / {what}: {outcome}: {' '.join(message.split())[:200]}"
             for kind, what, outcome, message in outcomes if outcome != "refused_clearly"]
    assert not wrong, "\n".join(wrong)
