import pytest

import lorakit

from lorakit import ConfigError, LoRAConfig


def test_defaults_match_the_issue():
    c = LoRAConfig()
    assert (c.r, c.lora_alpha, c.lora_dropout, c.use_rslora) == (8, 16.0, 0.0, False)
    assert c.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert c.scaling_for("x.q_proj") == 2.0


@pytest.mark.parametrize(
    "field,value",
    [
        ("r", 0), ("r", 2.5), ("r", True), ("lora_alpha", 0), ("lora_alpha", float("nan")),
        ("lora_dropout", 1.0), ("lora_dropout", -0.1), ("target_modules", []), ("target_modules", "(["),
        ("target_modules", [""]), ("init_lora_weights", "pissa"), ("bias", "some"),
        ("layers_to_transform", [-1]), ("rank_pattern", {"q_proj": 0}), ("alpha_pattern", {"q_proj": -1}),
        ("use_rslora", "yes"), ("rank_pattern", {"(": 4}), ("alpha_pattern", {"[": 2}), ("layers_pattern", 5),
        ("task_type", 5), ("base_model_name_or_path", 3),
    ],
)
def test_invalid_field_raises_value_error_naming_field_and_value(field, value):
    with pytest.raises(ValueError) as e:
        LoRAConfig(**{field: value})
    assert isinstance(e.value, ConfigError)
    assert field in str(e.value)


def test_rslora_scaling_is_alpha_over_sqrt_r():
    c = LoRAConfig(r=16, lora_alpha=8, use_rslora=True)
    assert c.scaling_for("q_proj") == 8 / 4


def test_rank_and_alpha_patterns_match_the_end_of_module_names_like_peft():
    c = LoRAConfig(r=8, rank_pattern={"q_proj": 2, "layers.1.self_attn.v_proj": 4}, alpha_pattern={"v_proj": 3})
    assert c.rank_for("model.layers.0.self_attn.q_proj") == 2
    assert c.rank_for("model.layers.0.self_attn.xq_proj") == 8  # not a name-segment match
    assert c.rank_for("model.layers.1.self_attn.v_proj") == 4
    assert c.rank_for("model.layers.0.self_attn.v_proj") == 8
    assert c.alpha_for("model.layers.0.self_attn.v_proj") == 3
    assert c.scaling_for("model.layers.1.self_attn.v_proj") == 3 / 4


def test_dict_round_trip_and_peft_type():
    c = LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj"], layers_to_transform=[0], rank_pattern={"q": 2})
    d = c.to_dict()
    assert d["peft_type"] == "LORA" and d["use_dora"] is False
    assert LoRAConfig.from_dict(d) == c


def test_peft_config_round_trip():
    peft = pytest.importorskip("peft")
    ours = LoRAConfig(r=4, lora_alpha=32, lora_dropout=0.1, use_rslora=True, target_modules=["q_proj", "v_proj"])
    fields = set(peft.LoraConfig.__dataclass_fields__)
    theirs = peft.LoraConfig(**{k: v for k, v in ours.to_dict().items() if k in fields and k != "peft_type"})
    assert (theirs.r, theirs.lora_alpha, theirs.lora_dropout, theirs.use_rslora) == (4, 32, 0.1, True)
    assert set(theirs.target_modules) == {"q_proj", "v_proj"}
    back = LoRAConfig.from_dict(theirs.to_dict())
    assert (back.r, back.lora_alpha, back.use_rslora, set(back.target_modules)) == (4, 32.0, True, {"q_proj", "v_proj"})


def test_unknown_peft_keys_only_accepted_at_neutral_value():
    d = LoRAConfig().to_dict()
    assert LoRAConfig.from_dict({**d, "use_dora": False, "lora_bias": False, "megatron_config": None}).r == 8
    with pytest.raises(ConfigError, match="use_qalora"):
        LoRAConfig.from_dict({**d, "use_qalora": True})
    with pytest.raises(ConfigError, match="init_lora_weights='loftq'"):  # LoftQ rewrote the base
        LoRAConfig.from_dict({**d, "loftq_config": {"loftq_bits": 4}, "init_lora_weights": "loftq"})
    assert LoRAConfig.from_dict({**d, "loftq_config": {"loftq_bits": 4}}).r == 8  # read only by that init
    with pytest.warns(lorakit.LoRAWarning, match=r"\['no_such_key'\].*ignored"):  # as PEFT: named, not fatal
        assert LoRAConfig.from_dict({**d, "no_such_key": 1}).r == 8
    with pytest.raises(ConfigError, match="did you mean 'lora_alpha'"):  # a misspelt field would change the math
        LoRAConfig.from_dict({**d, "lora_alpah": 1})
    with pytest.raises(ConfigError, match="IA3"):
        LoRAConfig.from_dict({**d, "peft_type": "IA3"})


@pytest.mark.parametrize("kwargs,message", [
    ({"lora_alpah": 16}, r"unknown LoRAConfig option 'lora_alpah'.*did you mean 'lora_alpha'"),
    ({"target_module": ["q_proj"]}, r"did you mean 'target_modules'"),
    ({"use_qalora": True}, r"use_qalora=True is a PEFT LoraConfig option lorakit does not support"),
    ({"xyzzy": 1}, r"unknown LoRAConfig option 'xyzzy'.*valid options: r, lora_alpha"),
])
def test_unknown_or_unsupported_keywords_raise_config_error_with_a_near_miss(kwargs, message):
    with pytest.raises(ConfigError, match=message) as info:
        LoRAConfig(**kwargs)
    assert isinstance(info.value, lorakit.LoRAError)  # the library's own error, not a bare TypeError


def test_peft_options_at_their_neutral_value_are_accepted_as_keywords():
    cfg = LoRAConfig(r=4, use_qalora=False, lora_bias=False, megatron_config=None)
    assert cfg.r == 4 and "use_qalora" not in vars(cfg) and "megatron_config" not in vars(cfg)


@pytest.mark.parametrize("value", [[""], 3, "(unclosed", [1]])
def test_invalid_exclude_modules(value):
    with pytest.raises(ConfigError, match="exclude_modules"):
        LoRAConfig(exclude_modules=value)


@pytest.mark.parametrize("field,value,message", [
    ("r", 0, "r must be an int >= 1"), ("use_dora", "yes", "use_dora must be True or False"),
    ("bias", "everything", "bias must be one of"),
])
def test_fields_set_after_construction_are_validated_by_inject(field, value, message):
    from torch import nn

    config = LoRAConfig(r=2, target_modules=["0"])
    setattr(config, field, value)
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ConfigError, match=message):
        lorakit.inject(model, config)
    assert type(model[0]) is nn.Linear
