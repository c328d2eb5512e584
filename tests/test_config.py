import pytest

from slowrun.config import (ConfigError, ModelConfig, RunConfig, build_config, config_from_dict, config_to_dict,
                            config_to_toml, describe_options, load_recipe, parse_overrides, recipe_names, tomllib)


def test_shipped_recipes_load_and_validate():
    assert {"baseline", "slowrun", "smoke"} <= set(recipe_names())
    for name in recipe_names():
        cfg = build_config(name)
        assert isinstance(cfg, RunConfig)
    base = build_config("baseline")
    assert (base.model.norm, base.model.pos, base.model.mlp, base.model.tie_embeddings) == ("layernorm", "learned", "gelu", True)
    assert (base.optim.name, base.optim.lr, base.optim.weight_decay, base.train.epochs) == ("adamw", 6e-4, 0.1, 1.0)
    slow = build_config("slowrun")
    assert slow.optim.name == "muon" and slow.model.dropout == 0.1 and slow.train.epochs > 1


def test_overrides_parse_as_toml_literals():
    o = parse_overrides(["--optim.weight_decay=1.6", "--train.epochs", "12", "--model.norm=rmsnorm",
                         "--model.qk_norm=false", "--distill.teacher=runs/a"])
    assert o == {"optim.weight_decay": 1.6, "train.epochs": 12, "model.norm": "rmsnorm", "model.qk_norm": False,
                 "distill.teacher": "runs/a"}
    cfg = build_config("slowrun", o)
    assert cfg.optim.weight_decay == 1.6 and cfg.train.epochs == 12.0 and cfg.model.qk_norm is False


def test_unknown_keys_are_named_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.weight_decy' \(did you mean optim.weight_decay\?\)"):
        build_config("slowrun", {"optim.weight_decy": 1.0})
    with pytest.raises(ConfigError, match="unknown config key 'optimizer"):
        build_config("slowrun", {"optimizer.lr": 1.0})
    with pytest.raises(ConfigError, match="unrecognized argument"):
        parse_overrides(["--epochs=3"])


def test_validation_names_the_option():
    with pytest.raises(ConfigError, match=r"optim.weight_decay: must be >= 0, got -1"):
        build_config("slowrun", {"optim.weight_decay": -1})
    with pytest.raises(ConfigError, match=r"model.n_embd: must be divisible by model.n_head=3"):
        build_config("slowrun", {"model.depth": -1, "model.n_embd": 256, "model.n_head": 3})
    with pytest.raises(ConfigError, match=r"model.norm: must be one of layernorm, rmsnorm"):
        build_config("slowrun", {"model.norm": "batchnorm"})
    with pytest.raises(ConfigError, match=r"train.epochs: expected a number"):
        build_config("slowrun", {"train.epochs": "many"})
    with pytest.raises(ConfigError, match=r"model.n_layer: expected an integer"):
        build_config("slowrun", {"model.n_layer": 2.5})


def test_resolved_config_round_trips_through_toml():
    cfg = build_config("slowrun", {"optim.weight_decay": 1.6, "model.depth": 6})
    again = config_from_dict(tomllib.loads(config_to_toml(cfg)))
    assert config_to_dict(again) == config_to_dict(cfg)


def test_a_size_the_recipes_depth_would_overwrite_is_refused():
    """The slowrun recipe is sized by model.depth; an n_layer, n_embd or n_head given alone would be
    overwritten by it without a word, so it is refused, naming the way out; with --model.depth=-1
    it is taken, and a depth given beside it wins (the ablations' size variants)."""
    assert build_config("slowrun").model.depth == 6
    for key in ("model.n_layer", "model.n_embd", "model.n_head"):
        with pytest.raises(ConfigError, match=rf"--{key}: this recipe sizes the model by model.depth=6.*--model.depth=-1"):
            build_config("slowrun", {key: 2})
    m = build_config("slowrun", {"model.depth": -1, "model.n_layer": 4, "model.n_head": 4, "model.n_embd": 256}).model
    assert (m.n_layer, m.n_head, m.n_embd) == (4, 4, 256)
    m = build_config("slowrun", {"model.depth": 5, "model.n_layer": 4}).model
    assert (m.n_layer, m.n_embd) == (5, 320)
    assert build_config("baseline", {"model.n_layer": 2}).model.n_layer == 2  # no depth: as given


def test_depth_knob_scales_width():
    m = ModelConfig(depth=6)
    assert (m.n_layer, m.n_embd, m.n_head) == (6, 384, 6)
    assert ModelConfig(n_embd=256, mlp="swiglu").hidden_dim == 768
    assert ModelConfig(n_embd=256, mlp="gelu").hidden_dim == 1024


def test_recipe_paths_and_errors(tmp_path):
    p = tmp_path / "mine.toml"
    p.write_text('[model]\nn_layer = 3\n[train]\nepochs = 2\n')
    assert build_config(str(p)).model.n_layer == 3
    with pytest.raises(ConfigError, match="unknown recipe 'nosuch'"):
        load_recipe("nosuch")
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_recipe(str(tmp_path / "missing.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_recipe(str(bad))


def test_every_option_is_documented():
    text = describe_options()
    for key in ("--model.n_layer", "--optim.weight_decay", "--train.max_steps", "--train.batch_tokens", "--train.seed",
                "--data.doc_shuffle", "--eval.every_steps", "--distill.alpha"):
        assert key in text


def test_attention_options_are_validated():
    for key, value, msg in [("model.window_pattern", "SSX", "model.window_pattern: must be a string of S and L"),
                            ("model.short_window", 0, "model.short_window: must be -1 or >= 1"),
                            ("model.xsa", "on", "model.xsa: must be one of off, fixed, learnable"),
                            ("model.xsa_layers", 0, "model.xsa_layers: must be -1"),
                            ("model.iha_pseudo", 0, "model.iha_pseudo: must be >= 1"),
                            ("optim.iha_lr", 0.0, "optim.iha_lr: must be > 0")]:
        with pytest.raises(ConfigError, match=msg):
            build_config("slowrun", {key: value})
    cfg = build_config("slowrun", {"model.window_pattern": "SSSL", "model.xsa": "learnable", "model.iha": True})
    assert (cfg.model.short_window, cfg.model.xsa_layers, cfg.model.iha_pseudo, cfg.optim.iha_lr) == (-1, -1, 1, 0.02)


def test_a_recipe_that_extends_another_is_its_values_with_its_own_over_them(tmp_path):
    (tmp_path / "small.toml").write_text('extends = "limited"\n[model]\nn_layer = 4\nn_embd = 128\n[train]\nmax_steps = 7\n')
    (tmp_path / "smaller.toml").write_text('extends = "small.toml"\n[model]\nn_embd = 64\nn_head = 2\n')  # relative to its own file
    limited = load_recipe("limited")
    small = load_recipe(str(tmp_path / "small.toml"))
    smaller = load_recipe(str(tmp_path / "smaller.toml"))
    assert (small["model"]["n_layer"], small["model"]["n_embd"], small["train"]["max_steps"]) == (4, 128, 7)
    assert (smaller["model"]["n_layer"], smaller["model"]["n_embd"], smaller["train"]["max_steps"]) == (4, 64, 7)
    # everything else is the parent's, key by key within each section
    for sec in limited:
        for k, v in limited[sec].items():
            if (sec, k) not in {("model", "n_layer"), ("model", "n_embd"), ("model", "n_head"), ("train", "max_steps")}:
                assert smaller[sec][k] == v, (sec, k)
    assert "extends" not in smaller
    built = build_config(str(tmp_path / "smaller.toml"), {"model.loop_start": 1, "model.loop_end": 2})
    assert (built.model.window_pattern, built.model.n_embd, built.optim.weight_decay) == ("SSSL", 64, 1.3)


def test_extends_errors_name_the_recipe(tmp_path):
    (tmp_path / "a.toml").write_text('extends = "b.toml"\n')
    (tmp_path / "b.toml").write_text('extends = "a.toml"\n')
    with pytest.raises(ConfigError, match="extends itself in a loop"):
        load_recipe(str(tmp_path / "a.toml"))
    (tmp_path / "c.toml").write_text('extends = "nosuch"\n')
    with pytest.raises(ConfigError, match=r"c.toml: extends = 'nosuch': unknown recipe 'nosuch'"):
        load_recipe(str(tmp_path / "c.toml"))
    (tmp_path / "d.toml").write_text('extends = 3\n')
    with pytest.raises(ConfigError, match="extends = 3"):
        load_recipe(str(tmp_path / "d.toml"))
    (tmp_path / "e.toml").write_text('extends = "limited"\nepochs = 3\n')
    with pytest.raises(ConfigError, match="outside a section"):
        load_recipe(str(tmp_path / "e.toml"))
