"""Every `emjax` sub-command resolves to a module with a main(argv) and answers --help."""

import importlib

import pytest

from emjax import cli


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
