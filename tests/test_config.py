"""YAML configs: every shipped file loads; every bad input names the file, the field, the value, the rule."""
import json
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings, strategies as st

from cptoolkit.config import ConfigError, config_from_dict, load_config

REPO = Path(__file__).resolve().parents[1]
# Sweep files are not run configs; demo_infer.yaml needs the checkpoint that `make demo` trains first.
SHIPPED = sorted(p for p in (REPO / "configs").glob("*.yaml")
                 if not p.name.startswith("sweep_") and p.name != "demo_infer.yaml")
MINIMAL = {"parallel": {"tp": 2, "pcp": 2, "dcp": 4}, "model": {}, "runtime": {},
           "inference": {"prompts": ["hi"]}}


def _with(section: str, **fields) -> dict:
    raw = json.loads(json.dumps(MINIMAL))
    raw.setdefault(section, {}).update(fields)
    return raw


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_configs_load_every_field_as_written(path):
    raw = yaml.safe_load(path.read_text())
    cfg = load_config(path)
    assert cfg.source == str(path)
    for section, fields in raw.items():
        for name, value in fields.items():
            loaded = getattr(getattr(cfg, section), name)
            if (section, name) == ("model", "checkpoint"):  # a checkpoint path resolves against the file's folder
                value = str(path.parent / value)
            assert loaded == value, f"{path.name}: {section}.{name} = {value!r} in the file, {loaded!r} loaded"
    sizes = {name: raw["parallel"].get(name, 1) for name in ("dp", "pcp", "tp")}
    assert cfg.parallel.world_size == sizes["dp"] * sizes["pcp"] * sizes["tp"], (path.name, sizes)


def test_reference_config_values():
    cfg = load_config(REPO / "configs/tp2_pcp2_dcp4.yaml")
    assert (cfg.parallel.tp, cfg.parallel.pcp, cfg.parallel.dcp) == (2, 2, 4)
    assert (cfg.model.num_attention_heads, cfg.model.num_kv_heads) == (8, 2)
    assert cfg.inference.temperature == 0.0 and cfg.train is None


@pytest.mark.parametrize("raw, message", [
    (_with("parallel", dcp=3), r"<t>: parallel \(tp=2, pcp=2, dcp=3, dp=1\) with model \(num_attention_heads=8, "
                               r"num_kv_heads=2\): dcp \(3\) must be k\*pcp with k dividing tp \(tp=2, pcp=2\): "
                               r"valid dcp values are 2, 4$"),
    (_with("parallel", tp=0), r"<t>: parallel.tp = 0: must be >= 1"),
    (_with("parallel", prefill_comm="ring"), r"parallel.prefill_comm = 'ring': must be one of 'p2p', 'all_gather'"),
    (_with("parallel", tpp=2), r"parallel.tpp: unknown field \(known: .*tp"),
    (_with("parallel", tp="2"), r"<t>: parallel.tp = '2': must be an integer$"),
    ({**_with("model", num_attention_heads=6, hidden_size=96), "parallel": {"tp": 4}},
     r"<t>: parallel \(tp=4, pcp=1, dcp=1, dp=1\) with model \(num_attention_heads=6, num_kv_heads=2\): "
     r"num_heads \(6\) must be a multiple of tp \(4\): each TP rank owns num_heads/tp query heads$"),
    (_with("model", num_kv_heads=3), r"model.num_kv_heads = 3: must divide num_attention_heads \(8\)"),
    (_with("inference", top_p=0.0), r"inference.top_p = 0.0: must be in \(0, 1\]"),
    (_with("inference", prompts=["a"], prompt_file="p.txt"), r"inference.prompts = \['a'\]: give at most one of prompts"),
    ({**MINIMAL, "extra": {}}, r"extra: unknown section"),
    ({k: v for k, v in MINIMAL.items() if k != "inference"}, r"exactly one of the sections 'inference' or 'train'"),
    ("just text", r"top level must be a mapping"),
    (_with("model", ffn_hidden_size=97), r"model.ffn_hidden_size = 97: must be a multiple of parallel.tp \(2\)"),
])
def test_invalid_configs_name_the_rule(raw, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw, source="<t>")


def test_a_section_left_out_takes_all_its_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("inference: {prompts: [a]}\n")
    cfg = load_config(path)
    written = config_from_dict({"parallel": {}, "model": {}, "runtime": {}, "inference": {"prompts": ["a"]}},
                               source=str(path))
    assert cfg == written and cfg.parallel.world_size == 1
    train = config_from_dict({"parallel": {"pcp": 2}, "train": {}}, source="<t>")
    assert (train.parallel.dcp, train.runtime.dtype) == (2, "float32")  # training's dcp default still applies


def test_train_seq_len_must_fit_dual_chunk_swap():
    raw = {k: v for k, v in MINIMAL.items() if k != "inference"} | {"train": {"seq_len": 30}}
    with pytest.raises(ConfigError, match=r"train.seq_len = 30: must be a multiple of 2\*parallel.pcp \(4\)"):
        config_from_dict(raw, source="<t>")


def test_training_needs_kv_heads_split_over_tp():
    raw = {k: v for k, v in MINIMAL.items() if k != "inference"} | {"train": {"seq_len": 32}}
    raw["model"] = {"num_kv_heads": 1}
    with pytest.raises(ConfigError, match=r"model.num_kv_heads = 1: must be a multiple of parallel.tp \(2\) "
                                          r"for training"):
        config_from_dict(raw, source="<t>")


def test_float_fields_accept_yaml_exponent_text(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("parallel: {}\nmodel: {norm_eps: 1e-6}\nruntime: {}\ninference: {prompts: [a]}\n")
    assert load_config(path).model.norm_eps == 1e-6


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("parallel:\n  tp: [2\nmodel: {}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: malformed YAML: line \d+, column \d+"):
        load_config(path)


def test_missing_file():
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config("nope.yaml")


def test_checkpoint_without_config_json(tmp_path):
    raw = _with("model", checkpoint=str(tmp_path))
    with pytest.raises(ConfigError, match=r"model.checkpoint = .*: no config.json in"):
        config_from_dict(raw, source="<t>")


def test_a2a_prefill_comms_load():
    cfg = config_from_dict(_with("parallel", prefill_comm="a2a"), source="<t>")
    assert (cfg.parallel.prefill_comm, cfg.parallel.hierarchical_a2a_size) == ("a2a", None)
    raw = _with("parallel", tp=1, pcp=4, dcp=4, prefill_comm="a2a+p2p", hierarchical_a2a_size=2)
    assert config_from_dict(raw, source="<t>").parallel.hierarchical_a2a_size == 2


@pytest.mark.parametrize("raw, message", [
    (_with("parallel", prefill_comm="a2a+p2p"),
     r"^<t>: parallel.hierarchical_a2a_size = None: required with prefill_comm 'a2a\+p2p': the a2a group size, a "
     r"divisor of pcp \(2\)$"),
    (_with("parallel", prefill_comm="a2a+p2p", hierarchical_a2a_size=3),
     r"^<t>: parallel.hierarchical_a2a_size = 3: must be a positive divisor of pcp \(2\): pcp = a2a size x ring "
     r"size; valid values are 1, 2$"),
    (_with("parallel", prefill_comm="a2a+p2p", hierarchical_a2a_size=0),
     r"^<t>: parallel.hierarchical_a2a_size = 0: must be a positive divisor of pcp \(2\)"),
    (_with("parallel", hierarchical_a2a_size=2),
     r"^<t>: parallel.hierarchical_a2a_size = 2: only allowed with prefill_comm 'a2a\+p2p' \(prefill_comm is 'p2p'\)$"),
    (_with("parallel", prefill_comm="a2a", hierarchical_a2a_size=2), r"only allowed with prefill_comm 'a2a\+p2p'"),
    ({**_with("parallel", prefill_comm="a2a"), "model": {"num_attention_heads": 6, "hidden_size": 96}},
     r"^<t>: parallel.prefill_comm = 'a2a': with model.num_attention_heads = 6 over parallel.tp = 2 and parallel.pcp "
     r"= 2, query heads per TP rank \(3\) must be a multiple of the a2a group size \(2 = pcp\): each member attends "
     r"whole query heads \(KV heads need no such rule: .*\); use p2p or all_gather, or an a2a group size that "
     r"divides the query heads$"),
    ({**_with("parallel", tp=1, pcp=4, dcp=4, prefill_comm="a2a+p2p", hierarchical_a2a_size=4),
      "model": {"num_attention_heads": 6, "hidden_size": 96}},
     r"^<t>: parallel.prefill_comm = 'a2a\+p2p': with model.num_attention_heads = 6 over parallel.tp = 1 and "
     r"parallel.pcp = 4, query heads per TP rank \(6\) must be a multiple of the a2a group size \(4 = "
     r"hierarchical_a2a_size\)"),
])
def test_a2a_prefill_comm_rules_name_field_value_and_rule(raw, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw, source="<t>")


def test_a_shape_field_beside_a_checkpoint_is_refused_not_replaced():
    raw = {"parallel": {}, "runtime": {}, "inference": {"prompts": ["x"]},
           "model": {"checkpoint": "../checkpoints/tiny-mqa", "num_kv_heads": 2}}
    with pytest.raises(ConfigError, match=r"model.num_kv_heads = 2: not allowed with model.checkpoint"):
        config_from_dict(raw, source="<t>", base_dir=REPO / "configs")


# ----------------------------------------------------------------------------- expert parallelism
def _moe(num_experts: int = 8, ffn_hidden_size: int = 64):
    from cptoolkit.models.moe_dims import MoEDims

    return MoEDims(num_experts=num_experts, top_k=1, ffn_hidden_size=ffn_hidden_size, moe_layers=(True, True))


def _with_experts(moe):
    """The model's routed experts as a checkpoint's config.json would give them (no family reads MoE keys yet)."""
    from unittest import mock

    return mock.patch("cptoolkit.config.model_moe", return_value=moe)


def test_ep_defaults_to_null_and_a_dense_model_takes_any_valid_ep():
    assert config_from_dict(MINIMAL, source="<t>").parallel.ep is None
    for ep in (2, 4):
        assert config_from_dict(_with("parallel", ep=ep), source="<t>").parallel.ep == ep


def test_a_dense_checkpoint_has_no_experts():
    from cptoolkit.config import model_moe

    raw = {"parallel": {"ep": 1}, "inference": {"prompts": ["x"]}, "model": {"checkpoint": "../checkpoints/tiny-mqa"}}
    cfg = config_from_dict(raw, source="<t>", base_dir=REPO / "configs")
    assert model_moe(cfg.model) is None and model_moe(config_from_dict(MINIMAL).model) is None


@pytest.mark.parametrize("raw, moe, message", [
    (_with("parallel", ep=3), None, r"^<t>: parallel.ep = 3: must be k\*pcp with k dividing tp \(tp=2, pcp=2\): "
                                    r"valid ep values are 2, 4 \(null: ep = pcp\)$"),
    (_with("parallel", ep=1), None, r"^<t>: parallel.ep = 1: must be k\*pcp"),
    (_with("parallel", ep="4"), None, r"^<t>: parallel.ep = '4': must be an integer or null$"),
    (_with("parallel", ep=4), _moe(num_experts=6),
     r"^<t>: parallel.ep = 4: the model's num_experts \(6, model.checkpoint's config.json\) must be a multiple of EP "
     r"\(4 = parallel.ep\): each EP rank holds num_experts/EP whole experts; valid ep values for this model are 2$"),
    (MINIMAL, _moe(num_experts=3),
     r"^<t>: parallel.ep = None: the model's num_experts \(3, .*\) must be a multiple of EP \(2 = parallel.pcp\): .*"
     r"valid ep values for this model are none$"),
    (_with("parallel", ep=2), _moe(ffn_hidden_size=5),
     r"^<t>: parallel.ep = 2: the model's expert ffn_hidden_size \(5, model.checkpoint's config.json\) must be a "
     r"multiple of ETP = parallel.tp \* parallel.pcp / EP \(2\*2/2 = 2\): each ETP rank holds an equal slice of every "
     r"expert's FFN; valid ep values for this model are 4$"),
])
def test_invalid_ep_names_field_value_and_rule(raw, moe, message):
    with _with_experts(moe), pytest.raises(ConfigError, match=message):
        config_from_dict(raw, source="<t>")


def _ep_rule(tp: int, pcp: int, ep, num_experts: int, ffn: int) -> str | None:
    """Which rule a (parallel, experts) pair breaks, from the rules alone; None when it breaks none."""
    if ep is not None and (ep % pcp or tp % (ep // pcp) or ep < pcp):
        return "must be k\\*pcp"
    ep = pcp if ep is None else ep
    if num_experts % ep:
        return "num_experts"
    return "expert ffn_hidden_size" if ffn % (tp * pcp // ep) else None


@settings(max_examples=300, deadline=None, derandomize=True)
@given(tp=st.sampled_from([1, 2, 3, 4, 6, 8]), pcp=st.sampled_from([1, 2, 3, 4]),
       ep=st.none() | st.integers(1, 40), num_experts=st.integers(1, 64), ffn=st.integers(1, 96))
def test_the_ep_rule_holds_for_any_parallel_layout_and_experts(tp, pcp, ep, num_experts, ffn):
    """A config loads exactly when ep is null or k*pcp with k | tp, num_experts is a multiple of EP and the expert
    FFN of ETP = tp*pcp/EP; otherwise the error names parallel.ep, its value and the first rule it breaks."""
    raw = {"parallel": {"tp": tp, "pcp": pcp, "dcp": pcp, "ep": ep}, "inference": {"prompts": ["x"]},
           "model": {"num_attention_heads": 24, "num_kv_heads": 24, "hidden_size": 96, "ffn_hidden_size": 96}}
    broken = _ep_rule(tp, pcp, ep, num_experts, ffn)
    with _with_experts(_moe(num_experts, ffn)):
        if broken is None:
            assert config_from_dict(raw, source="<t>").parallel.ep == ep
            return
        with pytest.raises(ConfigError, match=rf"^<t>: parallel.ep = {ep}: .*{broken}"):
            config_from_dict(raw, source="<t>")
