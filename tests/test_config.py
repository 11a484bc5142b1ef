"""raytr.config: YAML sections -> frozen dataclasses, errors that name the field."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from raytr.config import ConfigError, DataConfig, RaytrConfig, from_dict, load_config
from raytr.training.arguments import TrainingArguments

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write_yaml(tmp_path: Path, content: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(content))
    return path


def test_synthetic_config_loads():
    cfg = load_config(CONFIGS / "synthetic.yaml")
    assert isinstance(cfg, RaytrConfig)
    assert cfg.data.categorical == ("category",)
    assert cfg.data.continuous == ("price",)
    assert cfg.data.log_transform == ("price",)
    assert cfg.data.max_sequence_length == 20
    assert cfg.data.raw_columns == ["session_id", "item_id", "timestamp", "category", "price"]
    assert cfg.model.body == "gpt2" and cfg.model.objective == "clm"
    assert cfg.training.num_train_epochs == 5
    assert cfg.training.learning_rate == pytest.approx(0.002)
    assert cfg.training.metrics_top_k == (5, 10, 20)


def test_yoochoose_config_loads():
    cfg = load_config(CONFIGS / "yoochoose.yaml")
    assert cfg.data.read_format == "tsv"
    assert cfg.data.categorical == () and cfg.data.continuous == ()
    assert cfg.data.raw_columns == ["session_id", "item_id", "timestamp"]
    assert cfg.model.dropout == pytest.approx(0.2)
    assert cfg.training.output_dir == "runs/yoochoose/train"


def test_every_config_in_configs_loads():
    paths = sorted(CONFIGS.glob("*.yaml"))
    assert {p.name for p in paths} >= {"synthetic.yaml", "yoochoose.yaml"}
    for path in paths:
        load_config(path)


def test_no_path_gives_defaults():
    assert load_config() == RaytrConfig()


def test_configs_are_frozen():
    cfg = load_config(CONFIGS / "synthetic.yaml")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.data.max_sequence_length = 3  # type: ignore[misc]


def test_unknown_key_names_the_key_and_section(tmp_path):
    path = write_yaml(tmp_path, {"data": {"max_seq_len": 30}})
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert "max_seq_len" in msg
    assert ".data" in msg or "data:" in msg
    assert "max_sequence_length" in msg  # the known keys are listed as a hint


def test_unknown_section_names_it(tmp_path):
    path = write_yaml(tmp_path, {"dataa": {"item_col": "x"}})
    with pytest.raises(ConfigError, match="dataa"):
        load_config(path)


@pytest.mark.parametrize(
    "section, key, value",
    [
        ("data", "max_sequence_length", "20"),  # string for int
        ("data", "max_sequence_length", True),  # bool is not an int here
        ("data", "categorical", "category"),  # string for a list
        ("data", "time_features", "yes"),  # string for bool
        ("model", "dropout", "0.1"),  # string for float
        ("training", "metrics_top_k", [5, "ten"]),  # element type
        ("data", "item_col", 5),  # int for str
    ],
)
def test_wrong_type_names_the_field(tmp_path, section, key, value):
    path = write_yaml(tmp_path, {section: {key: value}})
    with pytest.raises(ConfigError, match=rf"{section}\.{key}"):
        load_config(path)


@pytest.mark.parametrize(
    "section, key, value",
    [("model", "body", "lstm"), ("data", "read_format", "json"), ("training", "lr_scheduler_type", "step"),
     ("training", "torch_compile_mode", "fast"), ("training", "loss_kernel", "cuda")],
)
def test_bad_literal_names_field_and_choices(tmp_path, section, key, value):
    path = write_yaml(tmp_path, {section: {key: value}})
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert f"{section}.{key}" in msg and repr(value) in msg
    assert "expected one of" in msg


def test_torch_compile_mode_turns_compiling_on_and_says_whether_it_uses_cuda_graphs():
    """As in Hugging Face: a mode implies torch_compile; the loop marks steps only for graph modes."""
    plain = load_config(overrides={"training": {"torch_compile": True}}).training
    assert plain.torch_compile and not plain.uses_cuda_graphs
    graphs = load_config(overrides={"training": {"torch_compile_mode": "reduce-overhead"}}).training
    assert graphs.torch_compile and graphs.uses_cuda_graphs
    autotune = load_config(overrides={"training": {"torch_compile_mode": "max-autotune-no-cudagraphs"}}).training
    assert autotune.torch_compile and not autotune.uses_cuda_graphs
    with pytest.raises(ConfigError, match=r"training\.torch_compile_mode='fast'.*reduce-overhead"):
        TrainingArguments(torch_compile_mode="fast")  # built in code, not from YAML: the same message


def test_int_accepted_for_float(tmp_path):
    cfg = load_config(write_yaml(tmp_path, {"training": {"learning_rate": 1}}))
    assert cfg.training.learning_rate == 1.0 and isinstance(cfg.training.learning_rate, float)


def test_exponent_numbers_are_numbers_in_files_and_overrides(tmp_path):
    """YAML 1.1 reads `1e-3` as a string (it wants `1.0e-3`); a learning rate is written so."""
    from raytr.cli import parse_overrides

    path = tmp_path / "c.yaml"
    path.write_text("training:\n  learning_rate: 1e-3\n  weight_decay: 5E-2\n"
                    "model:\n  hf_config: {layer_norm_epsilon: 1e-6}\n")
    cfg = load_config(path)
    assert cfg.training.learning_rate == 0.001 and cfg.training.weight_decay == 0.05
    assert cfg.model.hf_config == {"layer_norm_epsilon": 1e-6}
    assert load_config(overrides=parse_overrides(["training.learning_rate=2e-3"])).training.learning_rate == 0.002
    assert yaml_value("-1.5e+3") == -1500.0 and yaml_value(".5e2") == 50.0
    assert yaml_value("1e") == "1e" and yaml_value("e5") == "e5" and yaml_value("10") == 10  # not numbers, ints


def yaml_value(text: str):
    from raytr.config import load_yaml

    return load_yaml(f"v: {text}", "test")["v"]


def test_optional_field_accepts_null_and_value(tmp_path):
    assert load_config(write_yaml(tmp_path, {"data": {"user_col": None}})).data.user_col is None
    assert load_config(write_yaml(tmp_path, {"data": {"user_col": "user_id"}})).data.user_col == "user_id"


def test_overrides_replace_only_their_keys(tmp_path):
    cfg = load_config(
        CONFIGS / "synthetic.yaml",
        overrides={"training": {"num_train_epochs": 2}, "serve": {"port": 9000}, "model": {"d_model": 32}},
    )
    assert cfg.training.num_train_epochs == 2
    assert cfg.training.learning_rate == pytest.approx(0.002)  # untouched key of the same section
    assert cfg.model.d_model == 32
    own = load_config(write_yaml(tmp_path, {"serve": {"model_dir": "m", "default_k": 7}}), overrides={"serve": {"port": 9001}})
    assert own.serve.port == 9001 and own.serve.model_dir == "m" and own.serve.default_k == 7  # other keys kept
    absent = load_config(write_yaml(tmp_path, {"data": {"item_col": "item_id"}}), overrides={"serve": {"port": 9001}})
    assert absent.serve.port == 9001  # a section absent from the YAML
    assert cfg.data.categorical == ("category",)


def test_overrides_are_validated_like_yaml():
    """And named as the --set they came from, not as the config file's keys."""
    with pytest.raises(ConfigError, match=r"^--set model\.nope: unknown key; known keys of model: \["):
        load_config(CONFIGS / "synthetic.yaml", overrides={"model": {"nope": 1}})
    with pytest.raises(ConfigError, match=r"^--set model\.body='rnn': expected one of"):
        load_config(CONFIGS / "synthetic.yaml", overrides={"model": {"body": "rnn"}})
    with pytest.raises(ConfigError, match=r"^--set trainig\.\*: unknown section 'trainig'"):
        load_config(CONFIGS / "synthetic.yaml", overrides={"trainig": {"seed": 1}})


@pytest.mark.parametrize(
    "values, field",
    [
        ({"max_sequence_length": 1}, "max_sequence_length"),
        ({"min_session_length": 1}, "min_session_length"),
        ({"freq_threshold": -1}, "freq_threshold"),
        ({"continuous": ["price"], "log_transform": ["cost"]}, "log_transform"),
        ({"categorical": ["item_id"]}, "item_id"),  # one column in two roles
    ],
)
def test_data_post_init_names_the_field(values, field):
    with pytest.raises(ConfigError, match=field):
        from_dict(DataConfig, values, "data")


def test_metric_for_best_model_must_be_reported():
    with pytest.raises(ConfigError, match=r"metric_for_best_model='ndcg@10' is not among.*metrics_top_k=\[5, 20\]"):
        load_config(overrides={"training": {"metrics_top_k": [5, 20]}})
    with pytest.raises(ConfigError, match=r"metric_for_best_model='ndgc@10'.*choose one of \['precision@5'"):
        load_config(overrides={"training": {"metric_for_best_model": "ndgc@10"}})
    assert load_config(overrides={"training": {"metrics_top_k": [20], "metric_for_best_model": "mrr@20"}})


def test_user_column_in_another_role_and_non_mapping_sections(tmp_path):
    with pytest.raises(ConfigError, match=r"session_id.*more than one role"):
        load_config(overrides={"data": {"user_col": "session_id"}})
    path = tmp_path / "c.yaml"
    path.write_text("data: [1]\n")
    with pytest.raises(ConfigError, match=r"section 'data' must be a mapping"):
        load_config(path, overrides={"data": {"max_sequence_length": 5}})


def test_model_post_init_checks():
    with pytest.raises(ConfigError, match="n_heads"):
        load_config(overrides={"model": {"d_model": 10, "n_heads": 4}})
    with pytest.raises(ConfigError, match="mlm"):
        load_config(overrides={"model": {"body": "gpt2", "objective": "mlm"}})
    with pytest.raises(ConfigError, match=r"model\.logits_chunk_size"):
        load_config(overrides={"model": {"logits_chunk_size": 0}})
    with pytest.raises(ConfigError, match=r"model\.categorical_dim=0: expected >= 1"):  # would drop every feature
        load_config(overrides={"model": {"categorical_dim": 0}})
    for port in (0, 70000):
        with pytest.raises(ConfigError, match=rf"serve\.port={port}: expected a TCP port"):
            load_config(overrides={"serve": {"port": port}})
    # Unset, the full softmax's chunks are as large as the head's memory budget allows.
    assert load_config().model.logits_chunk_size is None
    assert load_config(overrides={"model": {"logits_chunk_size": 512}}).model.logits_chunk_size == 512
    assert load_config(overrides={"model": {"body": "bert", "objective": "mlm"}}).model.objective == "mlm"


@pytest.mark.parametrize("key, value, expected", [
    ("reload_poll_s", float("nan"), "a finite number > 0"), ("reload_poll_s", float("inf"), "a finite number > 0"),
    ("reload_poll_s", 0, "a finite number > 0"), ("batch_wait_timeout_s", float("nan"), "a finite number >= 0"),
    ("batch_wait_timeout_s", float("inf"), "a finite number >= 0"), ("batch_wait_timeout_s", -1, "a finite number >= 0"),
])
def test_serve_timings_must_be_finite_and_name_the_key(key, value, expected):
    with pytest.raises(ConfigError, match=re.escape(f"serve.{key}={float(value)}: expected {expected}")):
        load_config(overrides={"serve": {key: value}})
    serve = load_config(overrides={"serve": {"batch_wait_timeout_s": 0, "reload_poll_s": 0.5}}).serve
    assert serve.batch_wait_timeout_s == 0.0 and serve.reload_poll_s == 0.5


@pytest.mark.parametrize("value", ["hour", ["hour", 5], {"hour": True}, None])
def test_a_value_of_none_of_a_unions_types_lists_every_accepted_form(value):
    with pytest.raises(ConfigError, match=re.escape(f"data.time_features={value!r}: expected a list of strings, or "
                                                    "true or false")):
        load_config(overrides={"data": {"time_features": value}})
    with pytest.raises(ConfigError, match=r"model.logits_chunk_size='auto': expected an integer, or null"):
        load_config(overrides={"model": {"logits_chunk_size": "auto"}})


@pytest.mark.parametrize("text, section", [("training: 0", "training"), ("model: false", "model"),
                                           ("data: []", "data"), ('serve: ""', "serve")])
def test_a_section_that_is_not_a_mapping_is_an_error_naming_it(tmp_path, text, section):
    path = tmp_path / "c.yaml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError, match=rf"c\.yaml\.{section}=.*: expected a mapping of keys"):
        load_config(path)
    with pytest.raises(ConfigError, match=rf"section '{section}' must be a mapping"):  # with a --set into it
        load_config(path, overrides={section: {}})


@pytest.mark.parametrize("text", ["0", "[]", "false", '""'])
def test_a_file_that_is_not_a_mapping_is_an_error_naming_it(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError, match=r"^config file '.*c\.yaml' holds \w+ .*: expected a mapping of sections"):
        load_config(path)


def test_only_an_empty_file_or_section_means_the_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    for text in ("", "# nothing yet\n", "data:\nmodel: null\ntraining: {}\n"):
        path.write_text(text)
        assert load_config(path) == RaytrConfig()
    path.write_text("training:\n")
    assert load_config(path, overrides={"training": {"seed": 3}}).training.seed == 3


def test_missing_file_names_it(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(missing)
    with pytest.raises(ConfigError, match="is a directory; name a YAML file"):
        load_config(tmp_path)


def test_non_mapping_yaml(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)
    with pytest.raises(ConfigError, match="data"):
        load_config(write_yaml(tmp_path, {"data": [1, 2]}))


def test_yaml_syntax_error_names_the_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  body: gpt2\n  d_model: [64\ntraining: {}\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml'?: invalid YAML at line 4, column 9: .*expected ',' or ']'") as info:
        load_config(path)
    assert "unicode string" not in str(info.value)
    path.write_text("model:\n  body: gpt2\n\tn_layers: 2\n")  # a tab in the indentation
    with pytest.raises(ConfigError, match=r"broken\.yaml'?: invalid YAML at line 3"):
        load_config(path)
    path.write_text("data:\n  session_col: session_id\n  item_col item_id\n")  # a key without its colon, last
    with pytest.raises(ConfigError, match=r"invalid YAML at line 4, column 1: while scanning a simple key "
                                          r"\(line 3, column 3\); could not find expected ':'"):
        load_config(path)


def test_duplicate_yaml_keys_are_an_error_naming_key_file_and_lines(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("training:\n  learning_rate: 0.01\n  num_train_epochs: 2\n  learning_rate: 0.001\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml'?: key 'learning_rate' is given twice \(line 2 and line 4\)"):
        load_config(path)
    path.write_text("model: {d_model: 32}\nmodel: {n_layers: 1}\n")  # whole sections too
    with pytest.raises(ConfigError, match=r"key 'model' is given twice"):
        load_config(path)
    # a merge key (`<<`) overridden by an explicit key is YAML, not a duplicate
    path.write_text("defaults: &d {d_model: 32, n_heads: 2}\nmodel:\n  <<: *d\n  d_model: 64\n")
    with pytest.raises(ConfigError, match="unknown section 'defaults'|defaults"):
        load_config(path)  # the extra section is still an unknown section, but parsing got that far


def test_non_utf8_config_file_names_the_file(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("model:\n  body: gpt2  # caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.yaml'? is not UTF-8 text: line 2 has the byte b'\\xe9'"):
        load_config(path)


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("learning_rate", float("nan"), "finite number > 0"),
        ("learning_rate", float("inf"), "finite number > 0"),
        ("weight_decay", -0.1, "finite number >= 0"),
        ("weight_decay", float("nan"), "finite number >= 0"),
        ("adam_beta1", 1.0, "0 <= beta < 1"),
        ("adam_beta1", -0.1, "0 <= beta < 1"),
        ("adam_beta2", float("nan"), "0 <= beta < 1"),
        ("adam_beta2", 1.5, "0 <= beta < 1"),
        ("max_grad_norm", float("nan"), "finite number >= 0"),
        ("max_grad_norm", float("inf"), "finite number >= 0"),
        ("max_grad_norm", -1.0, "finite number >= 0"),
        ("warmup_steps", -1, ">= 0 (0: off)"),
        ("logging_steps", -5, ">= 0 (0: off)"),
        ("eval_steps", -1, ">= 0 (0: off)"),
        ("compute_metrics_each_n_steps", -1, ">= 0 (0: off)"),
        ("save_total_limit", 0, ">= 1 (checkpoints kept)"),
    ],
)
def test_training_numbers_out_of_range_name_the_key(key, value, expected):
    with pytest.raises(ConfigError, match=re.escape(f"training.{key}={value}: expected ") + ".*" + re.escape(expected)):
        load_config(overrides={"training": {key: value}})


def test_training_numbers_at_their_bounds_are_accepted():
    args = load_config(overrides={"training": {"weight_decay": 0, "adam_beta1": 0.0, "max_grad_norm": 0,
                                               "warmup_steps": 0, "eval_steps": 0}}).training
    assert args.max_grad_norm == 0.0 and args.adam_beta1 == 0.0


def test_to_dict_round_trip():
    cfg = load_config(CONFIGS / "synthetic.yaml", overrides={"data": {"user_col": "user_id"}})
    assert from_dict(RaytrConfig, cfg.to_dict(), "config") == cfg
    # and through YAML, as a run would save and reload it
    again = from_dict(RaytrConfig, yaml.safe_load(yaml.safe_dump(_plain(cfg.to_dict()))), "config")
    assert again == cfg


def _plain(value):
    """Tuples as lists, as YAML writes them."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
