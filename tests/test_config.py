import pytest

from pipeline.config import ConfigError, W2WConfig, from_dict, load_config, to_dict


def test_tiny_and_sd15_configs_load():
    tiny = load_config("conf/tiny.yaml")
    sd15 = load_config("conf/sd15.yaml")
    assert isinstance(tiny, W2WConfig)
    assert tiny.model.path == "builtin:tiny"
    # The published recipe (REFERENCE.md section 1).
    assert (sd15.lora.rank, sd15.lora.alpha, list(sd15.lora.targets)) == (1, 27.0, ["to_q", "to_v"])
    assert (sd15.train.steps, sd15.train.lr, sd15.train.weight_decay) == (800, 1e-4, 1e-2)
    assert sd15.train.instance_prompt == "sks person"
    assert sd15.train.prior_loss_weight == 1.0 and sd15.train.num_class_images == 200
    assert sd15.subspace.components == 1000


def test_dotlist_overrides():
    cfg = load_config("conf/tiny.yaml", ["train.steps=7", "build.out=/tmp/x", "lora.targets=[to_q]"])
    assert cfg.train.steps == 7
    assert cfg.build.out == "/tmp/x"
    assert cfg.lora.targets == ["to_q"]


def test_unknown_key_names_key_and_choices():
    with pytest.raises(ConfigError) as err:
        load_config("conf/tiny.yaml", ["train.stepz=5"])
    msg = str(err.value)
    assert "train.stepz" in msg and "steps" in msg and "Did you mean 'steps'" in msg


def test_unknown_section():
    with pytest.raises(ConfigError, match="unknown config key 'trian'.*Valid keys here: model, lora, train"):
        load_config(None, ["trian.steps=5"])


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match="train.steps"):
        load_config("conf/tiny.yaml", ["train.steps=many"])


def test_bad_choice_lists_valid_ones():
    with pytest.raises(ConfigError, match="subspace.method='svd'.*gram, randomized"):
        load_config("conf/tiny.yaml", ["subspace.method=svd"])
    with pytest.raises(ConfigError, match="build.trainer"):
        load_config("conf/tiny.yaml", ["build.trainer=fast"])
    with pytest.raises(ConfigError, match="train.lr_scheduler='step'.*constant, constant_with_warmup, linear, cosine"):
        load_config("conf/tiny.yaml", ["train.lr_scheduler=step"])


def test_range_checks():
    with pytest.raises(ConfigError, match="train.steps must be > 0"):
        load_config("conf/tiny.yaml", ["train.steps=0"])
    with pytest.raises(ConfigError, match="train.lr must be >= 0"):
        load_config("conf/tiny.yaml", ["train.lr=-1"])
    with pytest.raises(ConfigError, match="train.train_lora_a=false.*train.shared_init=true"):
        load_config("conf/tiny.yaml", ["train.train_lora_a=false", "train.shared_init=false"])
    with pytest.raises(ConfigError, match="lr_warmup_steps=10 has no effect with train.lr_scheduler=constant"):
        load_config("conf/tiny.yaml", ["train.lr_scheduler=constant", "train.lr_warmup_steps=10"])
    with pytest.raises(ConfigError, match="lr_warmup_steps=500 must be below train.steps=500"):
        load_config("conf/tiny.yaml", ["train.lr_scheduler=cosine", "train.lr_warmup_steps=500", "train.steps=500"])
    with pytest.raises(ConfigError, match="train.lr_warmup_steps must be >= 0"):
        load_config("conf/tiny.yaml", ["train.lr_warmup_steps=-1"])


def test_bad_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  nonsense: 3\n")
    with pytest.raises(ConfigError, match=f"train.nonsense.*{path.name}"):
        load_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.steps"])


def test_dict_round_trip():
    cfg = load_config("conf/sd15.yaml", ["train.steps=3"])
    assert from_dict(to_dict(cfg)) == cfg
