import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from coldfusion.collab.config import RunConfig, dump_config, load_config, parse_config
from coldfusion.infra.errors import ColdFusionError


def write(tmp_path, data, name="c.yaml"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_defaults_fill_everything(tmp_path):
    cfg = load_config(write(tmp_path, {"tasks": ["movie_sentiment"]}))
    assert cfg.model == "default" and cfg.fusion.method == "average" and cfg.loop.iterations == 3
    assert cfg.tasks[0].name == "movie_sentiment" and cfg.tasks[0].is_builtin


def test_unknown_key_names_the_key_and_file(tmp_path):
    path = write(tmp_path, {"tasks": ["a"], "loop": {"iterations": 2, "itterations": 3}}, "exp.yaml")
    with pytest.raises(ColdFusionError, match=r"exp\.yaml: invalid config:\n  - unknown key 'loop\.itterations'"):
        load_config(path)


def test_wrong_type_names_the_field(tmp_path):
    path = write(tmp_path, {"tasks": ["a"], "finetune": {"lr": "fast"}})
    with pytest.raises(ColdFusionError, match=r"'finetune\.lr': Input should be a valid number.*'fast'"):
        load_config(path)


def test_missing_tasks_unknown_method_and_bad_yaml(tmp_path):
    with pytest.raises(ColdFusionError, match=r"`tasks` needs at least one task \(one contributor each\)"):
        load_config(write(tmp_path, {"name": "x"}))
    with pytest.raises(ColdFusionError, match="'fusion': unknown fusion method 'mean'"):
        load_config(write(tmp_path, {"tasks": ["a"], "fusion": {"method": "mean"}}))
    with pytest.raises(ColdFusionError, match=r"'fusion': fusion method 'ties' has no parameter \['k'\]"):
        load_config(write(tmp_path, {"tasks": ["a"], "fusion": {"method": "ties", "params": {"k": 20}}}))
    with pytest.raises(ColdFusionError, match="not valid YAML"):
        load_config(write(tmp_path, "tasks: [a\n"))
    with pytest.raises(ColdFusionError, match="a YAML mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ColdFusionError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_task_spec_forms(tmp_path):
    cfg = parse_config({"tasks": ["bbc_topic", {"name": "mine", "path": "d.csv", "text_column": "sentence"}]})
    assert cfg.tasks[1].path.name == "d.csv" and not cfg.tasks[1].is_builtin
    with pytest.raises(ColdFusionError, match="give only one of"):
        parse_config({"tasks": [{"name": "m", "path": "a.csv", "hf_dataset": "glue"}]})


def test_resolved_config_round_trips():
    cfg = parse_config({"tasks": ["bbc_topic"], "loop": {"iterations": 5}})
    again = parse_config(yaml.safe_load(dump_config(cfg)))
    assert again == cfg


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.sampled_from(["name", "seed", "threads", "loop", "finetune", "model", "bogus", "tasks",
                                        "fusion", "attack", "engine", "flower", "evaluation", "max_length"]),
                       st.one_of(st.integers(-5, 5), st.text(max_size=5), st.none(), st.lists(st.text(max_size=4)),
                                 st.dictionaries(st.text(max_size=6), st.integers(), max_size=2)),
                       max_size=6))
def test_any_mapping_is_accepted_or_rejected_with_a_clear_error(data):
    """Property: the loader never crashes with anything but ColdFusionError naming a key."""
    try:
        cfg = parse_config(data, "prop.yaml")
    except ColdFusionError as exc:
        assert str(exc).startswith("prop.yaml: invalid config:")
    else:
        assert isinstance(cfg, RunConfig) and len(cfg.tasks) >= 1


NESTED = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-3, 300), st.floats(allow_nan=True),
                                st.text(max_size=6)),
                      lambda inner: st.one_of(st.lists(inner, max_size=3),
                                              st.dictionaries(st.sampled_from(
                                                  ["method", "params", "validation", "min_accepted", "stale",
                                                   "outlier_factor", "contributors", "kind", "factor", "iterations",
                                                   "name", "path", "epochs", "lr", "x"]), inner, max_size=3)),
                      max_leaves=8)


@settings(max_examples=80, deadline=None)
@given(section=st.sampled_from(["fusion", "attack", "loop", "finetune", "flower", "evaluation"]), value=NESTED)
def test_any_nested_section_is_accepted_or_names_the_field(section, value):
    """Property: a wrong type or value deep in a section is a ColdFusionError naming that section."""
    data = {"tasks": ["bbc_topic"], section: value}
    try:
        cfg = parse_config(data, "nested.yaml")
    except ColdFusionError as exc:
        assert str(exc).startswith("nested.yaml: invalid config:") and section in str(exc), str(exc)
    else:
        assert isinstance(cfg, RunConfig)


def test_a_deployment_names_contributors_and_only_a_deployment_does():
    deployment = {"engine": "flower", "flower": {"mode": "deployment"}}
    cfg = parse_config({**deployment, "contributors": ["acme", "globex"]})
    assert cfg.contributor_names == ["acme", "globex"] and cfg.tasks == []
    with pytest.raises(ColdFusionError, match=r"needs `contributors: \[NAME, ...\]`"):
        parse_config(deployment)
    with pytest.raises(ColdFusionError, match="names its contributors, not their data"):
        parse_config({**deployment, "contributors": ["acme"], "tasks": [{"name": "acme", "path": "claims.csv"}]})
    with pytest.raises(ColdFusionError, match="`contributors` names the SuperNodes of a Flower deployment"):
        parse_config({"tasks": ["bbc_topic"], "contributors": ["acme"]})
    with pytest.raises(ColdFusionError, match=r"unique across contributors and evaluation.suite: \['acme'\]"):
        parse_config({**deployment, "contributors": ["acme", "acme"]})
