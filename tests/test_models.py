"""SessionModel and its bodies: shapes, loss/backward, causality, padding, HF config mapping,
save -> load, batch checks, and one small "it learns" run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import BertConfig, MistralConfig

from raytr.config import ConfigError, ModelConfig
from raytr.data.loaders import causal_target_counts, ragged_from_arrow
from raytr.features import FIRST_ITEM_ID, NULL_ID, OOV_ID, FeatureSpec, SessionBatch
from raytr.metrics import RankingMetrics
from raytr.models import SessionModel, SessionOutput
from raytr.models.bodies import build_body, hf_config_for, model_config_values
from raytr.models.masking import split_last_item
from _model_fixtures import ALLOWED, CAUSAL, T, V, make_batch, random_batch, tiny_config, tiny_spec


def build(body: str, objective: str, seed: int = 0, **overrides) -> SessionModel:
    torch.manual_seed(seed)
    return SessionModel(tiny_spec(), tiny_config(body, objective, **overrides), seed=seed)


def perturb_position(batch: SessionBatch, t: int) -> SessionBatch:
    """Change the event at column t (item id and side features) in every row that has one."""
    ids = batch.item_ids.clone()
    real = ids[:, t] != 0
    ids[:, t] = torch.where(real, FIRST_ITEM_ID + (ids[:, t] - FIRST_ITEM_ID + 7) % (V - FIRST_ITEM_ID), ids[:, t])
    out = make_batch(ids)
    out.continuous = {k: v.clone() for k, v in batch.continuous.items()}
    for v in out.continuous.values():
        v[:, t] = torch.where(real, v[:, t] + 3.0, v[:, t])
    return out


# ------------------------------------------------------------------ training loss
# The loss is independent of the body: every combination with the full softmax, and the sampled
# softmax with one causal and one masked body.
LOSS_CASES = [(b, o, "full") for b, o in ALLOWED] + [("gpt2", "clm", "sampled"), ("xlnet", "mlm", "sampled")]


@pytest.mark.parametrize("body,objective,loss", LOSS_CASES)
def test_forward_backward_every_allowed_combination(body, objective, loss):
    model = build(body, objective, loss=loss)
    batch = random_batch(B=4)
    out = model(batch)
    assert isinstance(out, SessionOutput)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert out.hidden.shape == (4, T, 16) and out.labels.shape == (4, T)
    assert out.num_targets == int((out.labels != -100).sum()) > 0
    out.loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []  # DDP needs every trainable parameter to get a gradient


@pytest.mark.parametrize("aggregation", ["concat", "sum"])
def test_aggregations_and_no_side_features(aggregation):
    for spec in (tiny_spec(with_features=True), tiny_spec(with_features=False)):
        torch.manual_seed(0)
        model = SessionModel(spec, tiny_config(aggregation=aggregation))
        batch = random_batch(B=3, spec=spec)
        model(batch).loss.backward()
        assert model.inputs(batch).shape == (3, T, 16)


def test_clm_loss_counts_next_item_targets():
    model = build("gpt2", "clm")
    batch = make_batch([[5, 9, FIRST_ITEM_ID, 0, 0, 0], [7, NULL_ID, 4, OOV_ID, 6, 0]])
    out = model(batch)
    # targets: 9, FIRST_ITEM_ID | (null: ignored), 4, (OOV: ignored), 6
    assert out.num_targets == 4
    assert out.labels.tolist()[0] == [9, FIRST_ITEM_ID, -100, -100, -100, -100]
    assert out.labels.tolist()[1] == [-100, 4, -100, 6, -100, -100]


def test_mlm_masks_are_reproducible_with_a_generator():
    model = build("bert", "mlm").eval()
    batch = random_batch(B=6)
    a = model(batch, generator=torch.Generator().manual_seed(3))
    b = model(batch, generator=torch.Generator().manual_seed(3))
    c = model(batch, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.labels, b.labels) and torch.equal(a.loss, b.loss)
    assert not torch.equal(a.labels, c.labels)
    # the construction seed drives the model's own generator the same way
    m1, m2 = build("bert", "mlm", seed=11).eval(), build("bert", "mlm", seed=11).eval()
    assert torch.equal(m1(batch).labels, m2(batch).labels)


@pytest.mark.parametrize("body,objective", [("gpt2", "clm"), ("xlnet", "mlm"), ("gru", "clm")])
def test_the_seed_fixes_the_initial_weights_and_leaves_the_global_generator_alone(body, objective):
    def weights(seed: int):  # `build` would reseed the global generator itself
        model = SessionModel(tiny_spec(), tiny_config(body, objective), seed=seed)
        return {k: v.clone() for k, v in model.state_dict().items()}

    first = weights(5)
    torch.rand(100)  # the global generator moves on, as in a process that trains model after model
    state = torch.get_rng_state()
    second = weights(5)
    assert torch.equal(torch.get_rng_state(), state)  # building a seeded model drew nothing from it
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    other = weights(6)
    assert any(not torch.equal(first[k], other[k]) for k in first if first[k].is_floating_point())


def test_weights_are_tied_unless_disabled():
    tied = build("gpt2", "clm")
    assert tied.head.weight is tied.inputs.item_embedding.weight
    untied = build("gpt2", "clm", tie_weights=False)
    assert untied.head.weight is not untied.inputs.item_embedding.weight


# ------------------------------------------------------------------ causality and padding
@pytest.mark.parametrize("body,objective", CAUSAL)
def test_clm_bodies_are_strictly_causal(body, objective):
    model = build(body, objective).eval()
    batch = random_batch(B=3, min_len=T)  # full sessions: every column is a real event
    with torch.no_grad():
        base = model.body(model.inputs(batch), batch.mask)
        for t in range(1, T):
            changed = perturb_position(batch, t)
            out = model.body(model.inputs(changed), changed.mask)
            assert torch.allclose(out[:, :t], base[:, :t], atol=1e-5), f"position < {t} saw position {t}"
            assert not torch.allclose(out[:, t], base[:, t], atol=1e-5)  # the change itself is visible


@pytest.mark.parametrize("body", ["bert", "xlnet"])
def test_mlm_bodies_are_bidirectional(body):
    model = build(body, "mlm").eval()
    batch = random_batch(B=3, min_len=T)
    with torch.no_grad():
        base = model.body(model.inputs(batch), batch.mask)
        changed = perturb_position(batch, T - 1)
        out = model.body(model.inputs(changed), changed.mask)
    assert not torch.allclose(out[:, 0], base[:, 0], atol=1e-5)


@pytest.mark.parametrize("body,objective", ALLOWED)
def test_padding_never_affects_real_positions(body, objective):
    model = build(body, objective).eval()
    batch = random_batch(B=5, seed=1)
    mask = batch.mask
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, T, 16, generator=gen)
    garbage = torch.where(mask[..., None], x, 100 * torch.randn(5, T, 16, generator=gen))
    with torch.no_grad():
        a = model.body(x, mask)
        b = model.body(garbage, mask)
    assert torch.allclose(a[mask], b[mask], atol=1e-5)


# Ops that make the host wait for the GPU (a value read back, or an output whose size depends on
# the data). Counted on the CPU, where a dispatch mode sees them: each is a stalled queue on a GPU.
HOST_SYNC_OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero", "aten::equal",
                 "aten::masked_select", "aten::_unique2", "aten::unique_consecutive", "aten::repeat_interleave"}
# A training forward's budget: the target count (SessionModel.forward's nonzero) unless the batch
# carries it (loader batches, CLM), plus one inside Hugging Face's GPT-2/LLaMA (create_causal_mask's
# packed-sequence check on the position ids, skipped under torch.compile) and BERT MLM (its
# bidirectional-mask check on the padding mask).
TRAINING_FORWARD_SYNCS = {"gpt2": 1, "llama": 1, ("bert", "mlm"): 1}


class HostSyncs(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in HOST_SYNC_OPS:
            self.ops.append(func._schema.name)
        return func(*args, **(kwargs or {}))


def counted(batch: SessionBatch) -> SessionBatch:
    """`batch` as a loader gives it: ids checked, and its CLM target count made on the host."""
    rows = [row[row != 0].tolist() for row in batch.item_ids]  # right padding: the events are a prefix
    column = ragged_from_arrow(pa.array(rows, pa.list_(pa.int64())))
    batch.ids_checked = tiny_spec()  # build()'s
    batch.num_causal_targets = int(causal_target_counts(column, batch.item_ids.shape[1]).sum())
    return batch


@pytest.mark.parametrize("body,objective", ALLOWED)
def test_training_forward_host_syncs(body, objective):
    """A loader batch's CLM forward never sizes its targets on the device (the loader counted them on
    the host); MLM draws its masks there, so it does. Causal bodies get no padding mask (causality
    hides right padding): with one, Hugging Face's SDPA path read it on the host twice per forward."""
    model = build(body, objective).train()
    batch = counted(random_batch(B=5, seed=1))
    with HostSyncs() as syncs:
        model(batch)
    sizing = 0 if objective == "clm" else 1
    budget = sizing + TRAINING_FORWARD_SYNCS.get((body, objective), TRAINING_FORWARD_SYNCS.get(body, 0))
    assert syncs.ops.count("aten::nonzero") == sizing and len(syncs.ops) <= budget, syncs.ops


@pytest.mark.parametrize("body,objective", [("gpt2", "clm"), ("gru", "clm"), ("bert", "mlm")])
def test_a_batchs_target_count_changes_no_loss_or_gradient(body, objective):
    """The same step with the target count counted on the device (a plain batch) and carried by the
    batch (a loader's): equal loss, target count and gradients."""
    results = []
    for batch in (random_batch(B=6, seed=2), counted(random_batch(B=6, seed=2))):
        model = build(body, objective).train()
        torch.manual_seed(5)  # the same dropout
        out = model(batch, generator=torch.Generator().manual_seed(4))
        out.loss.backward()
        results.append((out.loss.detach(), out.num_targets,
                        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_a, n_a, grads_a), (loss_b, n_b, grads_b) = results
    assert n_a == n_b > 6 and torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and all(torch.equal(grads_a[k], grads_b[k]) for k in grads_a)


@pytest.mark.parametrize("body,objective", ALLOWED)
def test_scores_do_not_depend_on_batch_mates_or_trailing_padding(body, objective):
    model = build(body, objective).eval()
    batch = random_batch(B=5, seed=2)
    scores = model.score_next(batch)
    assert scores.shape == (5, V)
    for i, length in enumerate(batch.lengths.tolist()):
        width = min(length + 1, T)  # room for the MLM slot unless the session is full
        alone = batch.select(slice(i, i + 1))
        alone = SessionBatch(
            item_ids=alone.item_ids[:, :width],
            categorical={k: v[:, :width] for k, v in alone.categorical.items()},
            continuous={k: v[:, :width] for k, v in alone.continuous.items()},
        )
        assert torch.allclose(model.score_next(alone)[0], scores[i], atol=1e-4), i


# ------------------------------------------------------------------ Hugging Face config mapping
ROUND_TRIP_FIELDS = {
    "xlnet": {"d_model": 24, "n_layer": 3, "n_head": 4, "d_head": 6, "dropout": 0.15},
    "gpt2": {"n_embd": 24, "n_layer": 3, "n_head": 4, "resid_pdrop": 0.15, "embd_pdrop": 0.15,
             "attn_pdrop": 0.15, "n_positions": 9},
    "bert": {"hidden_size": 24, "num_hidden_layers": 3, "num_attention_heads": 4, "hidden_dropout_prob": 0.15,
             "attention_probs_dropout_prob": 0.15, "max_position_embeddings": 9},
    "llama": {"hidden_size": 24, "num_hidden_layers": 3, "num_attention_heads": 4, "head_dim": 6,
              "attention_dropout": 0.15, "max_position_embeddings": 9},
}


@pytest.mark.parametrize("body,objective", [c for c in ALLOWED if c[0] != "gru"])
def test_hf_config_mapping_round_trip(body, objective):
    config = ModelConfig(body=body, objective=objective, d_model=24, n_layers=3, n_heads=4, dropout=0.15)
    hf = hf_config_for(config, max_length=9)
    for field, value in ROUND_TRIP_FIELDS[body].items():
        assert getattr(hf, field) == value, field
    causal_field = {"xlnet": ("attn_type", "uni" if objective == "clm" else "bi"),
                    "bert": ("is_decoder", objective == "clm")}.get(body)
    if causal_field:
        assert getattr(hf, causal_field[0]) == causal_field[1]
    back = model_config_values(hf)
    assert back == {"body": body, "d_model": 24, "n_layers": 3, "n_heads": 4, "dropout": 0.15,
                    "objective": objective, "max_length": None if body == "xlnet" else 9}
    # and the values reach the built modules
    model = build_body(config, 9).model
    layers = {"xlnet": "layer", "gpt2": "h", "bert": "encoder.layer", "llama": "layers"}[body]
    assert len(model.get_submodule(layers)) == 3
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) > 0


def test_hf_extras_are_validated_by_name():
    with pytest.raises(ConfigError, match=r"unknown key 'layer_norm_eps' for GPT2Config.*layer_norm_epsilon"):
        hf_config_for(ModelConfig(body="gpt2", hf_config={"layer_norm_eps": 1e-5}), 8)
    with pytest.raises(ConfigError, match=r"'n_embd' is set from model.d_model"):
        hf_config_for(ModelConfig(body="gpt2", hf_config={"n_embd": 8}), 8)
    with pytest.raises(ConfigError, match=r"'hidden_size' is set from model.d_model"):  # alias of n_embd
        hf_config_for(ModelConfig(body="gpt2", hf_config={"hidden_size": 8}), 8)
    with pytest.raises(ConfigError, match="not a Hugging Face body"):
        build_body(ModelConfig(body="gru", hf_config={"n_inner": 8}), 8)
    with pytest.raises(ConfigError, match=r"model.hf_config=\{'n_inner': 'abc'\}: Hugging Face's GPT2Config refuses it"):
        hf_config_for(ModelConfig(body="gpt2", hf_config={"n_inner": "abc"}), 8)
    hf = hf_config_for(ModelConfig(body="gpt2", hf_config={"layer_norm_epsilon": 1e-6, "n_inner": 32}), 8)
    assert hf.layer_norm_epsilon == 1e-6 and hf.n_inner == 32
    hf = hf_config_for(ModelConfig(body="llama", hf_config={"num_key_value_heads": 2, "rms_norm_eps": 1e-5}), 8)
    assert hf.num_key_value_heads == 2 and hf.rms_norm_eps == 1e-5


@pytest.mark.parametrize("body, key", [("gpt2", "layer_norm_epsilon"), ("llama", "rms_norm_eps"),
                                       ("bert", "layer_norm_eps"), ("xlnet", "layer_norm_eps")])
def test_hf_extras_take_an_int_for_a_float_field(body, key):
    """YAML writes `layer_norm_epsilon: 1` as an int; Hugging Face's strict fields want a float."""
    hf = hf_config_for(ModelConfig(body=body, hf_config={key: 1}), 8)
    assert getattr(hf, key) == 1.0 and type(getattr(hf, key)) is float


def test_an_hf_extra_hugging_face_refuses_is_one_line_naming_the_field():
    with pytest.raises(ConfigError) as caught:
        hf_config_for(ModelConfig(body="gpt2", hf_config={"layer_norm_epsilon": "small"}), 8)
    assert "\n" not in str(caught.value)
    assert re.match(r"model.hf_config=\{'layer_norm_epsilon': 'small'\}: Hugging Face's GPT2Config refuses it: .*"
                    r"'layer_norm_epsilon' expected float, got str", str(caught.value)), str(caught.value)
    with pytest.raises(ConfigError, match="expected float, got bool"):  # true is not 1.0
        hf_config_for(ModelConfig(body="llama", hf_config={"rms_norm_eps": True}), 8)


def test_hf_extras_the_config_takes_but_the_model_cannot_build_or_run_are_config_errors():
    """GPT2Config takes any activation name and a negative FFN width; the model fails on them."""
    cases = [("gpt2", {"activation_function": "nope"}), ("gpt2", {"n_inner": -4}),
             ("llama", {"rope_parameters": {"rope_type": "bogus"}})]
    for body, extras in cases:
        with pytest.raises(ConfigError, match=rf"model.hf_config=\{{'{next(iter(extras))}': .*: the {body} body cannot "
                                              r"be built or run with it: \w+(Error|Exception)"):
            build_body(ModelConfig(body=body, d_model=16, n_heads=2, hf_config=extras), 8)
    body = build_body(ModelConfig(body="gpt2", d_model=16, n_heads=2, hf_config={"activation_function": "relu"}), 8)
    assert body.model.config.activation_function == "relu"


def test_objective_body_compatibility_errors():
    for body in ("gpt2", "llama", "gru"):
        with pytest.raises(ConfigError, match="bidirectional"):
            ModelConfig(body=body, objective="mlm")


def mistral(**overrides) -> MistralConfig:
    values = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=T, vocab_size=1, pad_token_id=0,
                  bos_token_id=None, eos_token_id=None)
    values.update(overrides)
    return MistralConfig(**values)


def test_custom_hf_config_mistral_trains_is_causal_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = SessionModel(tiny_spec(), tiny_config("gpt2", "clm"), hf_config=mistral())
    assert type(model.body.model).__name__ == "MistralModel" and model.body.is_causal
    batch = random_batch(B=4)
    model(batch).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad():
        base = model.body(model.inputs(batch), batch.mask)
        changed = perturb_position(batch, 3)
        assert torch.allclose(model.body(model.inputs(changed), changed.mask)[:, :3], base[:, :3], atol=1e-5)
    model.save(tmp_path)
    loaded = SessionModel.load(tmp_path)
    assert type(loaded.body.model).__name__ == "MistralModel"
    assert torch.equal(loaded.score_next(batch), model.score_next(batch))


def test_custom_hf_config_errors():
    spec = tiny_spec()
    with pytest.raises(ConfigError, match="hidden_size=32 but model.d_model=16"):
        SessionModel(spec, tiny_config(), hf_config=mistral(hidden_size=32))
    bidirectional = BertConfig(vocab_size=1, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32, max_position_embeddings=T)
    with pytest.raises(ConfigError, match="needs a causal body"):
        SessionModel(spec, tiny_config("bert", "clm"), hf_config=bidirectional)
    with pytest.raises(ConfigError, match="needs a bidirectional body"):
        SessionModel(spec, tiny_config("bert", "mlm"), hf_config=mistral())


# ------------------------------------------------------------------ inference and artifacts
@pytest.mark.parametrize("body,objective", ALLOWED)
def test_save_load_gives_identical_scores(body, objective, tmp_path):
    model = build(body, objective, tie_weights=(body != "gru")).eval()
    batch = random_batch(B=4, seed=3)
    model.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = SessionModel.load(tmp_path, map_location="cpu")
    assert not loaded.training
    assert loaded.config == model.config and loaded.spec == model.spec
    assert torch.equal(loaded.score_next(batch), model.score_next(batch))
    assert loaded.head.weight is loaded.inputs.item_embedding.weight or body == "gru"


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        SessionModel.load(tmp_path)


def test_load_names_a_corrupt_config_json(tmp_path):
    saved = Path(build("gpt2", "clm").save(tmp_path / "model"))
    config = saved / "config.json"
    good = config.read_text()
    config.write_text(good[: len(good) // 2])  # cut short, as by a full disk
    with pytest.raises(ValueError, match=re.escape(f"{saved}/config.json is not valid JSON (")):
        SessionModel.load(saved)
    config.write_bytes(b"\xff\xfe{}")
    with pytest.raises(ValueError, match=re.escape(f"{saved}/config.json is not valid JSON")):
        SessionModel.load(saved)
    config.write_text("[1, 2]")
    with pytest.raises(ValueError, match=re.escape(f"{saved}/config.json has no feature_spec and model_config")):
        SessionModel.load(saved)


@pytest.mark.parametrize("section,change,field", [
    ("feature_spec", lambda d: d.pop("item_id"), "missing 1 required positional argument: 'item_id'"),
    ("feature_spec", lambda d: d.update(categorical=["a"]), "feature_spec.categorical=['a']: expected a mapping"),
    ("feature_spec", lambda d: d.update(item_cardinality=None), "feature_spec.item_cardinality=None: expected an integer"),
    ("feature_spec", lambda d: d.update(max_sequence_length="abc"), "feature_spec.max_sequence_length='abc'"),
    ("feature_spec", lambda d: d.update(continuous="price-list"), "feature_spec.continuous='price-list'"),
    ("hf_config", lambda d: d.pop("model_type"), "hf_config: expected a mapping with a model_type"),
    ("hf_config", None, "hf_config: expected a mapping with a model_type"),  # a list
    ("hf_config", lambda d: d.update(model_type="nope"), "hf_config: not a config transformers can build"),
])
def test_load_names_the_malformed_field_of_config_json(tmp_path, section, change, field):
    saved = Path(SessionModel(tiny_spec(), tiny_config("gpt2"), hf_config=hf_config_for(tiny_config("gpt2"), T),
                              seed=0).save(tmp_path / "model"))
    meta = json.loads((saved / "config.json").read_text())
    if change is None:
        meta[section] = [1]
    else:
        change(meta[section])
    (saved / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=re.escape(f"{saved}/config.json:") + ".*" + re.escape(field)) as info:
        SessionModel.load(saved)
    assert "\n" not in str(info.value)


def test_load_on_cuda_without_a_gpu_says_so(tmp_path, monkeypatch):
    saved = build("gpt2", "clm").save(tmp_path / "model")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="map_location='cuda': no CUDA GPU is visible"):
        SessionModel.load(saved, map_location="cuda")
    with pytest.raises(ValueError, match="map_location='tpu9' is not a torch device"):
        SessionModel.load(saved, map_location="tpu9")
    with pytest.raises(ValueError, match="map_location='meta' holds no data"):
        SessionModel.load(saved, map_location="meta")
    with pytest.raises(ValueError, match="map_location='xla' cannot be used here"):  # not in this torch build
        SessionModel.load(saved, map_location="xla")


def test_load_refuses_weights_that_are_not_finite(tmp_path):
    saved = Path(build("gpt2", "clm").save(tmp_path / "model"))
    weights = load_file(saved / "model.safetensors")
    name = next(n for n, t in weights.items() if t.is_floating_point() and "embedding" in n)
    weights[name][0, 0] = float("nan")
    save_file(weights, saved / "model.safetensors")
    with pytest.raises(ValueError, match=re.escape(f"{saved}/model.safetensors: weight ") + ".*NaN or infinite"):
        SessionModel.load(saved)


def test_load_reads_format_1_except_a_repeat_bias_it_would_score_differently(tmp_path):
    batch = random_batch(B=4, seed=3)
    for repeat_bias in (False, True):
        model = SessionModel(tiny_spec(), tiny_config("gpt2", repeat_bias=repeat_bias), seed=0).eval()
        saved = Path(model.save(tmp_path / f"bias-{repeat_bias}"))
        meta = json.loads((saved / "config.json").read_text())
        assert meta["format_version"] == 2
        (saved / "config.json").write_text(json.dumps(meta | {"format_version": 1}))
        if repeat_bias:
            with pytest.raises(ValueError, match="format_version=1 with model.repeat_bias: .*train it again"):
                SessionModel.load(saved)
        else:
            assert torch.equal(SessionModel.load(saved).score_next(batch), model.score_next(batch))
    (saved / "config.json").write_text(json.dumps(meta | {"format_version": 3}))
    with pytest.raises(ValueError, match="format_version=3, this raytr reads 1 and 2"):
        SessionModel.load(saved)


def test_recommend_contract():
    model = build("gpt2", "clm").eval()
    batch = random_batch(B=4, seed=4)
    scores = model.score_next(batch)
    assert torch.all(scores[:, :FIRST_ITEM_ID] == float("-inf"))
    assert torch.all(torch.isfinite(scores[:, FIRST_ITEM_ID:]))
    num_recommendable = V - FIRST_ITEM_ID  # padding, null and OOV are never recommended
    ids, vals = model.recommend(batch, k=num_recommendable)
    assert ids.shape == (4, num_recommendable) and ids.dtype == torch.long and vals.dtype == torch.float32
    assert ids.min() >= FIRST_ITEM_ID
    assert all(sorted(row) == list(range(FIRST_ITEM_ID, V)) for row in ids.tolist())
    assert torch.all(vals[:, :-1] >= vals[:, 1:])
    assert torch.equal(vals, scores.gather(1, ids))
    ids, _ = model.recommend(batch, k=5, exclude_seen=True)
    for row, seen in zip(ids.tolist(), batch.item_ids.tolist()):
        assert not set(row) & set(seen)
    with pytest.raises(ValueError, match=f"k={num_recommendable + 1}"):
        model.recommend(batch, k=num_recommendable + 1)


def test_mlm_scores_full_sessions_by_dropping_the_first_event():
    model = build("bert", "mlm").eval()
    full = random_batch(B=2, min_len=T, seed=5)
    shifted = make_batch(torch.cat([full.item_ids[:, 1:], torch.zeros(2, 1, dtype=torch.long)], dim=1))
    shifted.continuous = {k: torch.cat([v[:, 1:], torch.zeros(2, 1)], dim=1) for k, v in full.continuous.items()}
    assert torch.allclose(model.score_next(full), model.score_next(shifted), atol=1e-5)


def test_check_batch_errors_name_the_problem():
    model = build("gpt2", "clm")
    bad = make_batch([[5, V, 3, 0, 0, 0]])
    expected = rf"column 'item_id-list' has id {V} \(max {V}, min 0\) but its cardinality is {V}"
    with pytest.raises(ValueError, match=expected):
        model(bad)
    too_long = make_batch(torch.full((1, T + 1), 3))
    with pytest.raises(ValueError, match=f"T={T + 1} columns but max_sequence_length={T}"):
        model.score_next(too_long)
    missing = random_batch(B=2)
    del missing.continuous["price-list"]
    with pytest.raises(ValueError, match="missing continuous column 'price-list'"):
        model.check_batch(missing)
    missing = random_batch(B=2)
    del missing.categorical["category-list"]
    with pytest.raises(ValueError, match="missing categorical column 'category-list'"):
        model.check_batch(missing)
    bad_cat = random_batch(B=2)
    bad_cat.categorical["category-list"][0, 0] = 7
    with pytest.raises(ValueError, match="column 'category-list' has id 7"):
        model.check_batch(bad_cat)
    with pytest.raises(ValueError, match="no events"):
        model.score_next(make_batch([[0] * T]))


# ------------------------------------------------------------------ it learns
def successor_sessions(n: int, gen: torch.Generator, v: int = 30, t: int = 6) -> torch.Tensor:
    """Sessions of consecutive ids (item i is always followed by i + 1), right-padded, [n, t]."""
    lengths = torch.randint(2, t + 1, (n,), generator=gen)
    starts = torch.randint(FIRST_ITEM_ID, v - t, (n,), generator=gen)
    ids = starts[:, None] + torch.arange(t)[None, :]
    return ids * (torch.arange(t)[None, :] < lengths[:, None])


def test_gpt2_learns_deterministic_successor():
    from raytr.features import FeatureSpec

    spec = FeatureSpec(item_id="item", item_cardinality=30, max_sequence_length=6)
    config = ModelConfig(body="gpt2", d_model=32, n_layers=1, n_heads=2, dropout=0.0, logits_chunk_size=128)
    torch.manual_seed(0)
    model = SessionModel(spec, config)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(100):
        loss = model(SessionBatch(item_ids=successor_sessions(64, gen))).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    prefix, targets = split_last_item(SessionBatch(item_ids=successor_sessions(256, gen)))
    metrics = RankingMetrics([1, 5])
    metrics.update(model.score_next(prefix), targets)
    assert metrics.compute()["recall@1"] > 0.9, metrics.compute()


@pytest.mark.slow
def test_compile_regions_gives_the_eager_loss_and_keeps_parameter_names():
    config = ModelConfig(body="gpt2", d_model=32, n_layers=1, n_heads=2, dropout=0.0)
    eager = SessionModel(SPEC_FOR_COMPILE, config, seed=0)
    compiled = SessionModel(SPEC_FOR_COMPILE, config, seed=0)
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_regions()
    assert list(compiled.state_dict()) == list(eager.state_dict())
    batch = SessionBatch(item_ids=torch.tensor([[5, 9, 7, 0], [4, 6, 8, 10], [3, 3, 0, 0]]))
    a, b = eager(batch), compiled(batch)
    assert torch.allclose(a.loss, b.loss, atol=1e-5)
    b.loss.backward()
    assert all(p.grad is not None for p in compiled.parameters() if p.requires_grad)


SPEC_FOR_COMPILE = FeatureSpec(item_id="item_id-list", item_cardinality=20, max_sequence_length=4)


# --- repeat bias -------------------------------------------------------------------------------


def _set_repeat_weight(model: SessionModel, values: list[float]) -> None:
    with torch.no_grad():
        model.head.repeat_weight.copy_(torch.tensor(values + [values[-1]] * (T - len(values))))


@pytest.mark.parametrize("body", ["gpt2", "gru"])
def test_repeat_bias_adds_its_weight_by_distance_to_scores_and_loss(body):
    import torch.nn.functional as F

    model = SessionModel(tiny_spec(), tiny_config(body, repeat_bias=True), seed=0).eval()
    assert model.head.repeat_weight.shape == (T,) and not model.head.repeat_weight.any()  # starts as no bias
    plain = SessionModel(tiny_spec(), tiny_config(body), seed=0).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k != "head.repeat_weight"})
    batch = make_batch([[5, 7, 5, 9, 0, 0], [8, 0, 0, 0, 0, 0]])
    assert torch.equal(model.score_next(batch), plain.score_next(batch))
    _set_repeat_weight(model, [2.0, 1.0, 0.5])
    scores, base = model.score_next(batch), plain.score_next(batch)
    expected = base.clone()
    expected[0, 9] += 2.0  # the last event (distance 0)
    expected[0, 5] += 1.0  # seen 1 and 3 events before it: its latest occurrence alone counts
    expected[0, 7] += 0.5  # 2 events before
    expected[1, 8] += 2.0
    assert torch.allclose(scores, expected, atol=1e-5)
    # The training loss: every CLM position's logits biased by the items up to it (each item by its
    # latest occurrence up to that position), full softmax.
    loss = model(batch).loss
    ids = batch.item_ids
    hidden = model.body(model.inputs(batch), batch.mask)
    logits, targets = [], []
    for b, t in [(0, 0), (0, 1), (0, 2)]:
        row = hidden[b, t] @ model.head.weight.T
        latest = {int(ids[b, s]): t - s for s in range(t + 1)}  # later events overwrite earlier ones
        for item, d in latest.items():
            row[item] += model.head.repeat_weight[min(d, T - 1)]
        logits.append(row[FIRST_ITEM_ID:])
        targets.append(ids[b, t + 1] - FIRST_ITEM_ID)
    assert loss.item() == pytest.approx(F.cross_entropy(torch.stack(logits), torch.stack(targets)).item(), rel=1e-5)
    loss.backward()
    assert model.head.repeat_weight.grad is not None and model.head.repeat_weight.grad.abs().sum() > 0


@pytest.mark.parametrize("variant", ["repeat_bias", "repeat_mixture"])
def test_repeat_scoring_learns_what_a_plain_model_must_memorise(variant):
    """Sessions x, y, x over 25 items: the third item repeats the first. The repeat bias or mixture
    learns it in a few steps for every x; the plain model has to learn each of the 25 items'
    embeddings for it."""
    from raytr.features import FeatureSpec

    spec = FeatureSpec(item_id="item", item_cardinality=FIRST_ITEM_ID + 25, max_sequence_length=3)
    gen = torch.Generator().manual_seed(0)

    def sessions(n: int) -> torch.Tensor:
        x, y = (FIRST_ITEM_ID + torch.randint(25, (2, n), generator=gen))
        return torch.stack([x, y, x], dim=1)

    recall = {}
    for repeats in (False, True):
        config = ModelConfig(body="gpt2", d_model=16, n_layers=1, n_heads=2, dropout=0.0, **{variant: repeats})
        model = SessionModel(spec, config, seed=0)
        optimizer = torch.optim.Adam(model.parameters(), lr=5e-2)
        for _ in range(30):
            loss = model(SessionBatch(item_ids=sessions(64))).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        prefix, targets = split_last_item(SessionBatch(item_ids=sessions(256)))
        metrics = RankingMetrics([1])
        metrics.update(model.score_next(prefix), targets)
        recall[repeats] = metrics.compute()["recall@1"]
    assert recall[True] > 0.95 and recall[False] < 0.5, recall


def _mixture_by_hand(model: SessionModel, hidden: torch.Tensor, events: list[int]) -> torch.Tensor:
    """log p over the classes for one position: hidden [D], events the session's items up to it."""
    head = model.head
    logits = (hidden @ head.weight.T)[FIRST_ITEM_ID:]
    g = torch.sigmoid(head.repeat_gate(hidden)).squeeze()
    kept = [(i, len(events) - 1 - s) for s, i in enumerate(events) if i >= FIRST_ITEM_ID]
    p = (1 - g) * torch.softmax(logits, 0) if kept else torch.softmax(logits, 0)
    if kept:
        attention = torch.stack([logits[i - FIRST_ITEM_ID] + head.repeat_weight[min(d, T - 1)] for i, d in kept])
        weights = torch.softmax(attention, 0)
        repeat = torch.zeros_like(p)
        for (i, _), w in zip(kept, weights):
            repeat[i - FIRST_ITEM_ID] += w
        p = p + g * repeat
    return p.log()


def test_repeat_mixture_mixes_the_session_items_with_the_softmax_by_a_learned_gate():
    model = SessionModel(tiny_spec(), tiny_config("gpt2", repeat_mixture=True), seed=0).eval()
    head = model.head
    assert head.repeat_weight.shape == (T,) and not head.repeat_weight.any() and not head.repeat_gate.weight.any()
    with torch.no_grad():
        head.repeat_weight.copy_(torch.linspace(2.0, -1.0, T))
        head.repeat_gate.weight.normal_(0.0, 0.5)
        head.repeat_gate.bias.fill_(0.3)
    batch = make_batch([[5, 7, 5, 9, 0, 0], [8, 0, 0, 0, 0, 0], [OOV_ID, OOV_ID, 0, 0, 0, 0]])
    scores = model.score_next(batch)
    assert torch.isinf(scores[:, :FIRST_ITEM_ID]).all()
    assert torch.allclose(scores[:, FIRST_ITEM_ID:].exp().sum(dim=1), torch.ones(3), atol=1e-5)  # probabilities
    hidden = model.next_hidden(batch)
    for b, events in enumerate([[5, 7, 5, 9], [8], [OOV_ID, OOV_ID]]):
        assert torch.allclose(scores[b, FIRST_ITEM_ID:], _mixture_by_hand(model, hidden[b], events), atol=1e-5)
    # The OOV-only session has nothing to repeat: the plain softmax.
    plain = torch.log_softmax(hidden[2] @ head.weight[FIRST_ITEM_ID:].T, 0)
    assert torch.allclose(scores[2, FIRST_ITEM_ID:], plain, atol=1e-5)
    # The training loss: -log p(next item) at every CLM position, p the mixture over the events so far.
    train = make_batch([[5, 7, 5, 9, 0, 0], [OOV_ID, 6, 6, 0, 0, 0]])
    loss = model(train).loss
    ids = train.item_ids
    body = model.body(model.inputs(train), train.mask)
    nll = [-_mixture_by_hand(model, body[b, t], ids[b, : t + 1].tolist())[ids[b, t + 1] - FIRST_ITEM_ID]
           for b, t in [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]]
    assert loss.item() == pytest.approx(torch.stack(nll).mean().item(), rel=1e-5)
    loss.backward()
    grads = [head.repeat_weight.grad, head.repeat_gate.weight.grad, head.repeat_gate.bias.grad, head.weight.grad]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("variant", ["repeat_bias", "repeat_mixture"])
def test_score_temperature_divides_the_catalog_logits_when_scoring_and_never_in_training(tmp_path, variant):
    from raytr.models.export import ExportedScorer, export_scorer

    model = SessionModel(tiny_spec(), tiny_config("gpt2", **{variant: True}), seed=0).eval()
    _set_repeat_weight(model, [2.0, 1.0, 0.5])
    if variant == "repeat_mixture":
        with torch.no_grad():
            model.head.repeat_gate.bias.fill_(-0.5)
    batch = make_batch([[5, 7, 5, 9, 0, 0], [8, 0, 0, 0, 0, 0]])
    loss, untempered = model(batch).loss.item(), model.score_next(batch)
    model.set_score_temperature(4.0)
    scores, hidden = model.score_next(batch), model.next_hidden(batch)
    assert model.config.score_temperature == 4.0 and model(batch).loss.item() == loss  # training as it was
    assert not torch.allclose(scores, untempered)
    if variant == "repeat_bias":  # logits / 4, then the same bias as before
        expected = (hidden @ model.head.weight.T) / 4.0
        expected[0, 9] += 2.0
        expected[0, 5] += 1.0  # its latest occurrence
        expected[0, 7] += 0.5
        expected[1, 8] += 2.0
        assert torch.allclose(scores[:, FIRST_ITEM_ID:], expected[:, FIRST_ITEM_ID:], atol=1e-5)
    else:  # the mixture of the tempered logits (the gate reads the hidden state, untouched)
        with torch.no_grad():
            model.head.weight.div_(4.0)  # logits / 4, as far as the mixture is concerned
            expected = [_mixture_by_hand(model, hidden[b], events) for b, events in enumerate([[5, 7, 5, 9], [8]])]
            model.head.weight.mul_(4.0)
        assert torch.allclose(scores[:, FIRST_ITEM_ID:], torch.stack(expected), atol=1e-5)
    assert torch.isinf(scores[:, :FIRST_ITEM_ID]).all()
    model.save(tmp_path / "m")  # saved with the model, and in its exported scorer
    loaded = SessionModel.load(tmp_path / "m").eval()
    assert loaded.config.score_temperature == 4.0 and torch.equal(loaded.score_next(batch), scores)
    scorer = ExportedScorer.load(export_scorer(model, tmp_path / "scorer.pt2"))
    assert torch.allclose(scorer(batch), scores, atol=1e-5)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match=rf"model.score_temperature={bad}: expected a finite number > 0"):
            model.set_score_temperature(bad)
    assert model.config.score_temperature == 4.0 and model.head.score_temperature == 4.0  # a refusal changes nothing
    with pytest.raises(ConfigError, match="score_temperature=2.0: .*needs model.repeat_bias or model.repeat_mixture"):
        tiny_config("gpt2", score_temperature=2.0)


@pytest.mark.parametrize("variant", ["repeat_bias", "repeat_mixture"])
def test_repeat_scoring_round_trips_and_is_clm_full_only(tmp_path, variant):
    model = SessionModel(tiny_spec(), tiny_config("xlnet", **{variant: True}), seed=0).eval()
    _set_repeat_weight(model, [1.5, 0.25])
    if variant == "repeat_mixture":
        with torch.no_grad():
            model.head.repeat_gate.bias.fill_(-0.5)
    model.save(tmp_path / "m")
    loaded = SessionModel.load(tmp_path / "m").eval()
    batch = random_batch(4, seed=1)
    assert getattr(loaded.config, variant) and torch.equal(loaded.score_next(batch), model.score_next(batch))
    for overrides, match in (({"objective": "mlm"}, "objective='mlm'"), ({"loss": "sampled"}, "loss='sampled'")):
        with pytest.raises(ConfigError, match=f"{variant} needs objective='clm' and loss='full'.*{match}"):
            tiny_config("xlnet", **{variant: True}, **overrides)
    with pytest.raises(ConfigError, match="repeat_bias and model.repeat_mixture.*set one of them"):
        tiny_config("xlnet", repeat_bias=True, repeat_mixture=True)


@pytest.mark.parametrize("body", ["bert", "xlnet"])
def test_mlm_next_item_scores_do_not_depend_on_the_batch_width(body):
    """A session filling a batch narrower than T kept its events only when the batch had a spare
    column: its mask slot took the first event's place instead."""
    model = SessionModel(tiny_spec(), tiny_config(body, "mlm"), seed=0).eval()
    narrow = make_batch([[5, 9, 7, 4], [8, 6, 0, 0]], seed=5)  # T = 6; row 0 fills the 4 columns

    def pad(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(x, (0, T - x.shape[1]))

    wide = SessionBatch(pad(narrow.item_ids), {k: pad(v) for k, v in narrow.categorical.items()},
                        {k: pad(v) for k, v in narrow.continuous.items()})
    assert torch.equal(model.score_next(narrow), model.score_next(wide))


@pytest.mark.parametrize("attn_type,objective", [("uni", "clm"), ("bi", "mlm")])
def test_a_user_xlnet_config_builds_for_its_attention_direction(attn_type, objective):
    """XLNet's max_position_embeddings is -1 (relative positions, no limit), and a padding mask
    made its causality probe fail for attn_type='uni'."""
    from transformers import XLNetConfig

    hf = XLNetConfig(vocab_size=1, d_model=16, n_layer=2, n_head=2, d_head=8, d_inner=32, attn_type=attn_type)
    model = SessionModel(tiny_spec(), tiny_config("xlnet", objective), hf_config=hf, seed=0)
    assert model.body.is_causal == (attn_type == "uni")
    other = "mlm" if objective == "clm" else "clm"
    with pytest.raises(ConfigError, match=f"objective='{other}' needs a"):
        SessionModel(tiny_spec(), tiny_config("xlnet", other), hf_config=hf, seed=0)


def test_saved_weights_are_as_readable_as_the_config(tmp_path):
    """safetensors writes an owner-only file; a bundle served by another user must read it."""
    import os

    old = os.umask(0o022)
    try:
        saved = Path(build("gpt2", "clm").save(tmp_path / "model"))
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in saved.iterdir()}
    assert modes == {"config.json": 0o644, "model.safetensors": 0o644}
