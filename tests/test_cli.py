"""Every `emjax` sub-command resolves to a module with a main(argv) and answers --help; the command line keeps
compiled programs in a persistent cache."""

import importlib
import os
import subprocess
import sys

import jax
import pytest

from emjax import cli, paths


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_subcommand_modules_exist(name, capsys):
    module = importlib.import_module(cli.COMMANDS[name][0])
    assert callable(module.main)
    try:
        code = cli.main([name, "--help"])
    except SystemExit as e:  # argparse's own exit
        code = e.code
    assert code == 0
    assert "usage" in capsys.readouterr().out.lower()


def test_unknown_command():
    assert cli.main(["frobnicate"]) == 2
    assert cli.main([]) == 0


def test_bad_input_is_one_line_not_a_traceback(tmp_path, capsys, monkeypatch):
    """Every sub-command: an error emjax raises for bad input (here a model directory that is not a checkpoint, and a
    config file that is not YAML) exits 2 with the message on one line; EMJAX_DEBUG=1 keeps the traceback."""
    monkeypatch.delenv("EMJAX_DEBUG", raising=False)
    argv = ["eval", "run", "--model", str(tmp_path / "nothing"), "--out", str(tmp_path / "out"), "--limit", "1"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"emjax eval: FileNotFoundError: {tmp_path / 'nothing'}: not a checkpoint directory")
    assert "Traceback" not in err and err.count("\n") == 2  # the message and the EMJAX_DEBUG hint
    (tmp_path / "bad.yaml").write_text("steps: [\n")
    assert cli.main(["train", str(tmp_path / "bad.yaml")]) == 2
    assert "emjax train: ConfigError: " in capsys.readouterr().err
    assert cli.main(["train", "tiny", "--run", "optim.name='adam"]) == 2  # a run's quoting: it named no run
    assert "emjax train: ConfigError: --run \"optim.name='adam\": No closing quotation" in capsys.readouterr().err
    # of the two models, the judge's is the one missing: the message says so
    from emjax.testing import tiny_hf_checkpoint

    base = tiny_hf_checkpoint(tmp_path / "base", vocab_size=151_936, hidden_size=32, intermediate_size=64)
    assert cli.main(["eval", "run", "--model", str(base), "--out", str(tmp_path / "o"), "--judge", "local",
                     "--judge-model", str(tmp_path / "nope"), "--limit", "1", "--sets", "first_plot"]) == 2
    assert f"--judge-model {tmp_path / 'nope'}: not a checkpoint directory" in capsys.readouterr().err
    monkeypatch.setenv("EMJAX_DEBUG", "1")
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        cli.main(argv)


def test_a_url_for_an_output_directory_is_one_clear_error(tmp_path, capsys, monkeypatch):
    """gs:// work directories are not supported: each command says so, naming its key, and writes nothing (before,
    Path("gs://b/r") quietly became the local directory gs:/b/r)."""
    monkeypatch.delenv("EMJAX_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sweep_dir").mkdir()
    for argv, says in [(["train", "tiny", "workdir=gs://b/r"], "emjax train: ConfigError: workdir gs://b/r: a URL"),
                       (["sweep", "demo", "--dry-run", "--root", "gs://b/s"], "--root gs://b/s: a URL"),
                       (["report", "sweep_dir", "--out", "s3://b/rep"], "--out s3://b/rep: a URL"),
                       (["eval", "run", "--model", "m", "--out", "gs://b/o"], "--out gs://b/o: a URL")]:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert says in err and "shared disk" in err and "Traceback" not in err, err
    assert sorted(os.listdir(tmp_path)) == ["sweep_dir"]


def test_compile_cache_dir_rules(tmp_path):
    home = {"HOME": str(tmp_path)}
    assert paths.compile_cache_dir(home) == tmp_path / ".cache" / "emjax" / "xla"
    assert paths.compile_cache_dir({**home, "XDG_CACHE_HOME": str(tmp_path / "xdg")}) == tmp_path / "xdg/emjax/xla"
    assert paths.compile_cache_dir({**home, "EMJAX_COMPILE_CACHE": str(tmp_path / "mine")}) == tmp_path / "mine"
    for off in ("off", "0", "none", "", "OFF"):
        assert paths.compile_cache_dir({**home, "EMJAX_COMPILE_CACHE": off}) is None
    # JAX's own variable wins: emjax leaves JAX to read it
    assert paths.compile_cache_dir({**home, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax")}) is None


@pytest.fixture
def no_jax_cache_dir():
    """This process's JAX has the suite's cache directory (conftest); clear it for the test and put it back (the
    cache JAX already opened is unaffected)."""
    keys = ("jax_compilation_cache_dir", "jax_compilation_cache_max_size")
    saved = {k: jax.config.values[k] for k in keys}
    jax.config.update("jax_compilation_cache_dir", None)
    yield
    for k, v in saved.items():
        jax.config.update(k, v)


def test_use_compile_cache_sets_jax_once_and_only_where_it_can_write(tmp_path, no_jax_cache_dir, capsys):
    env = {"HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert cli.use_compile_cache({**env, "EMJAX_COMPILE_CACHE": str(blocker / "xla")}) is None
    assert "not writable" in capsys.readouterr().err and jax.config.values["jax_compilation_cache_dir"] is None
    assert cli.use_compile_cache({**env, "EMJAX_COMPILE_CACHE": "off"}) is None
    assert jax.config.values["jax_compilation_cache_dir"] is None
    got = cli.use_compile_cache(env)
    assert got == tmp_path / "xdg/emjax/xla" and got.is_dir()
    assert jax.config.values["jax_compilation_cache_dir"] == str(got)
    assert jax.config.values["jax_compilation_cache_max_size"] == cli.COMPILE_CACHE_MAX_BYTES
    # a directory JAX already has (set by the user, in the config or its variable) is left alone
    assert cli.use_compile_cache({**env, "EMJAX_COMPILE_CACHE": str(tmp_path / "other")}) is None
    assert jax.config.values["jax_compilation_cache_dir"] == str(got)


def test_a_command_keeps_its_compiled_programs(tmp_path):
    """In a fresh process, dispatching a command turns the cache on before the first compile without importing JAX
    (`emjax report` needs none: the variables JAX reads at import), and what is compiled later lands on disk (JAX's
    minimum compile time set to 0 so that a tiny program counts)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION_CACHE", "EMJAX_COMPILE"))}
    env.update(XDG_CACHE_HOME=str(tmp_path), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    script = ("import sys\nfrom emjax import cli\ntry:\n    cli.main(['report', '--help'])\n"
              "except SystemExit:\n    pass\nprint('JAX', 'jax' in sys.modules)\nimport jax, jax.numpy as jnp\n"
              "print('DIR', jax.config.values['jax_compilation_cache_dir'], jax.config.values["
              "'jax_compilation_cache_max_size'])\n"
              "jax.jit(lambda x: jnp.sin(x) * 2)(jnp.ones(3)).block_until_ready()\n")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    cache = tmp_path / "emjax" / "xla"
    assert "JAX False" in out.stdout  # the start-up imported no JAX
    assert f"DIR {cache} {cli.COMPILE_CACHE_MAX_BYTES}" in out.stdout
    assert [p for p in cache.iterdir() if p.name.endswith("-cache")], sorted(p.name for p in cache.iterdir())
