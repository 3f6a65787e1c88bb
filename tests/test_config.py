"""The config tree: the embedded default builds, overrides apply, bad keys/values name the field."""

import pytest
import yaml

from kka_ray.config import ConfigError, KKAConfig, apply_overrides, load_config


def test_embedded_default_loads_and_matches_model_defaults():
    cfg = load_config()
    assert cfg.run.iterations == 3
    # eta weighs the labelled terms: 1000 lets ~40 generated anomalies count against ~5400 normals
    # (chosen on validation, see config.py); eps, beta as method.md; tau a quantile, not the maximum
    assert cfg.evaluator.eta == 1000.0 and cfg.evaluator.eps == 1e-6 and cfg.evaluator.init_scale == "unit"
    assert cfg.preference.beta == 0.1
    assert cfg.evaluator.threshold == "quantile" and cfg.evaluator.quantile == 0.98
    assert cfg.describer.template == "list" and cfg.describer.templates["list"].chat is False
    # every shipped field is a known field: a round trip through YAML gives the same tree
    assert load_config().to_dict() == KKAConfig.model_validate(yaml.safe_load(cfg.to_yaml())).to_dict()


def test_overrides_parse_yaml_values():
    cfg = load_config(overrides=["run.iterations=2", "run.mode=rep", "data.normal_classes=[3, 4]",
                                 "describer.temperature=0.7", "run.output_dir=null"])
    assert cfg.run.iterations == 2 and cfg.run.mode == "rep"
    assert cfg.data.normal_classes == [3, 4]
    assert cfg.describer.temperature == 0.7
    assert cfg.run.output_dir is None


@pytest.mark.parametrize("override, field", [
    ("describer.temprature=0.5", "describer.temprature"),
    ("run.iterations=0", "run.iterations"),
    ("run.mode=both", "run.mode"),
    ("evaluator.threshold=median", "evaluator.threshold"),
    ("nosuchsection.x=1", "nosuchsection"),
])
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=f"'{field}"):
        load_config(overrides=[override])


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_overrides({}, ["run.iterations"])
    with pytest.raises(ConfigError, match="is not a section"):
        apply_overrides({"run": {"iterations": 3}}, ["run.iterations.x=1"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listy)


def test_unknown_template_name_is_an_error():
    with pytest.raises(ConfigError, match="describer"):
        load_config(overrides=["describer.template=nonexistent"])
    cfg = load_config(overrides=["describer.template='Write like this: {description}'"])
    assert "{description}" in cfg.describer.template


def test_placement_strategy_needs_resources_to_reserve():
    with pytest.raises(ConfigError, match="drawer.resources.*placement_strategy needs"):
        load_config(overrides=["drawer.resources.num_cpus=0", "drawer.resources.placement_strategy=PACK"])


def test_vllm_lora_ranks_are_checked():
    with pytest.raises(ConfigError, match="'describer.max_lora_rank'.*320"):
        load_config(overrides=["describer.max_lora_rank=12"])
    # an adapter vLLM could not load: its rank above the engine's maximum
    with pytest.raises(ConfigError, match="preference.lora_r 32 is above describer.max_lora_rank 16") as err:
        load_config(overrides=["describer.backend=vllm", "preference.lora_r=32"])
    assert "<root>" not in str(err.value)
    assert load_config(overrides=["describer.backend=vllm", "preference.lora_r=32", "describer.max_lora_rank=32"])
    assert load_config(overrides=["preference.lora_r=32"])  # transformers loads any rank


def test_the_shipped_default_is_generated_from_the_code():
    """configs/default.yaml states no default of its own: it is the code's defaults, written by
    ``python -m kka_ray.config`` (regenerate it after changing a default)."""
    from kka_ray.config import default_config_text, generated_default_text

    assert default_config_text() == generated_default_text(), (
        "kka_ray/configs/default.yaml differs from the defaults in kka_ray/config.py: "
        "python -m kka_ray.config > kka_ray/configs/default.yaml")


def _readme_examples() -> list[tuple[str, dict]]:
    """Every config the README shows: YAML blocks of config sections, and the key=value overrides
    of its `kka run` / `kka submit` command lines (a shell variable stands for a path)."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    sections = set(KKAConfig.model_fields)
    found = []
    for block in re.findall(r"```yaml\n(.*?)```", text, flags=re.S):
        tree = yaml.safe_load(block)
        if isinstance(tree, dict) and set(tree) <= sections:
            found.append(("yaml block", tree))
    for line in re.findall(r"^\s*(kka (?:run|submit \w+) .*)$", text, flags=re.M):
        overrides = [t.replace("$HOME", "/home/u") for t in line.split("#")[0].split()
                     if "=" in t and not t.startswith("-")]
        if overrides:
            found.append((line, apply_overrides({}, overrides)))
    return found


def test_every_shipped_config_validates():
    """The default, the GPU config and every config example in the README load without error."""
    from pathlib import Path

    from kka_ray.config import from_dict

    root = Path(__file__).resolve().parents[1]
    for path in sorted((root / "kka_ray" / "configs").glob("*.yaml")):
        load_config(path)
    examples = _readme_examples()
    assert len(examples) >= 5  # the GPU block and the command lines
    for where, tree in examples:
        try:
            from_dict(tree)
        except ConfigError as err:
            raise AssertionError(f"README example {where!r}: {err}") from None
