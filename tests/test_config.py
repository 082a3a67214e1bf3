"""Every config file in configs/ validates against the schema; overrides and errors name their key."""

from pathlib import Path

import pytest

from emjax import config as cfglib

CONFIGS = sorted(p.name for p in cfglib.CONFIG_DIR.glob("*.yaml"))


@pytest.mark.parametrize("name", CONFIGS)
def test_config_files_validate(name):
    cfg = cfglib.load(name)
    assert cfg.lora.rank >= 1 and cfg.data.batch_size >= 1


def test_overrides_and_errors(tmp_path):
    cfg = cfglib.load("qwen3_8b", ["optim.name=muon", "data.batch_size=32"])
    assert (cfg.optim.name, cfg.data.batch_size, cfg.model.checkpoint) == ("muon", 32, "Qwen/Qwen3-8B")
    with pytest.raises(cfglib.ConfigError, match="data.batch_sz"):
        cfglib.load("qwen3_8b", ["data.batch_sz=3"])
    with pytest.raises(cfglib.ConfigError, match="expected key=value"):
        cfglib.load("qwen3_8b", ["optim.name"])
    with pytest.raises(cfglib.ConfigError, match=r"'optim=3': optim is a section of keys, not a value: set optim.KEY"):
        cfglib.load("qwen3_8b", ["steps=3", "optim=3"])
    with pytest.raises(cfglib.ConfigError, match=r"lora_b\$:16' is not Optional \(in a \{key: value\} mapping, put a "
                                                 r"space after the colon\)"):
        cfglib.load("qwen3_8b", ["optim.lr_scales={lora_b$:16}"])
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("workdir: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(cfglib.ConfigError, match=r"latin.yaml: not UTF-8 text \(byte 0xe9 at offset 12\)"):
        cfglib.load(latin)
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  learning_rat: 1\n")
    with pytest.raises(cfglib.ConfigError, match=r"bad.yaml.*learning_rat"):
        cfglib.load(bad)
    assert Path(cfglib.find_config("tiny")).name == "tiny.yaml"


@pytest.mark.parametrize("text, match", [
    ("steps: 3\ndata:\n  batch_size: [\n", r"bad.yaml: not valid YAML: .*line 4, column 1"),  # unclosed list
    ("steps: 3\nsteps: 4\n", r"bad.yaml: not valid YAML: .*duplicate key steps.*line 2"),
    ("- steps\n- 3\n", r"bad.yaml: a config file is a mapping of keys to values, not a list"),
    ("data:\n  batch_size: many\n", r"bad.yaml: bad config key 'data.batch_size': Value 'many' .* could not be "
                                      r"converted to Integer$"),
    ("steps: 3\nmodel: tiny\n", r"bad.yaml: model is a section of keys, not a value"),  # it said: bad config key ''
])
def test_a_malformed_config_file_is_one_error_naming_the_file(tmp_path, text, match):
    """YAML syntax (with its line), a file that is not a mapping and a mistyped value: a ConfigError naming the file,
    in one line (not a YAML traceback, nor OmegaConf's extra lines repeating the key)."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(cfglib.ConfigError, match=match) as e:
        cfglib.load(bad)
    assert "\n" not in str(e.value)


def test_per_group_learning_rates_from_the_command_line():
    """``optim.lr_scales`` as a whole mapping or one key at a time; a factor that is not a number names its key."""
    from emjax.optim import build

    cfg = cfglib.load("tiny", ['optim.lr_scales={lora_b$: 16, "(gate|up)_proj": 0.5}', "optim.total_steps=10"])
    assert dict(cfg.optim.lr_scales) == {"lora_b$": 16.0, "(gate|up)_proj": 0.5}
    build(cfg.optim)  # validates
    assert dict(cfglib.load("tiny", ["optim.lr_scales.lora_b$=16"]).optim.lr_scales) == {"lora_b$": 16.0}
    with pytest.raises(cfglib.ConfigError, match=r"optim\.lr_scales\.lora_b"):
        cfglib.load("tiny", ["optim.lr_scales.lora_b=fast"])


def test_parsing_a_config_imports_no_jax_grain_or_tfds():
    """``--help``, a sweep listing its runs and the sweep's parent process parse configs only: the schemas live in
    emjax.config so that costs no JAX, grain or TFDS import (seconds each)."""
    import subprocess
    import sys

    code = ("import sys, emjax.config as c, emjax.sweep; c.load('tiny', ['optim.name=muon', 'data.max_length=64']); "
            "print(sorted(m for m in ('jax', 'grain', 'tensorflow_datasets', 'optax', 'flax') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_local_paths_are_made_absolute(tmp_path, monkeypatch):
    """Relative local paths (files only where they exist; hub ids, study sets and module names untouched) become
    absolute on load, so config.yaml and printed commands name the same files from any directory."""
    monkeypatch.chdir(tmp_path)
    for d in ("ckpt", "judge"):
        (tmp_path / d).mkdir()
    (tmp_path / "rows.jsonl").write_text("")
    (tmp_path / "mine.yaml").write_text("")
    (tmp_path / "my_optims.py").write_text("")
    cfg = cfglib.load("tiny", ["model.checkpoint=ckpt", "eval.judge_checkpoint=judge", "data.dataset=rows.jsonl",
                               "plugins=[my_optims.py,some_module]", "eval.question_sets=[turner,mine.yaml]",
                               "data.tfds_dir=out/tfds"])
    assert (cfg.model.checkpoint, cfg.eval.judge_checkpoint, cfg.data.dataset, cfg.data.tfds_dir) == \
        (str(tmp_path / "ckpt"), str(tmp_path / "judge"), str(tmp_path / "rows.jsonl"), str(tmp_path / "out/tfds"))
    assert list(cfg.plugins) == [str(tmp_path / "my_optims.py"), "some_module"]
    assert list(cfg.eval.question_sets) == ["turner", str(tmp_path / "mine.yaml")]
    hub = cfglib.load("tiny", ["model.checkpoint=Qwen/Qwen3-8B", "data.dataset=insecure"])
    assert (hub.model.checkpoint, hub.data.dataset) == ("Qwen/Qwen3-8B", "insecure")
