"""The CLI surface: every command documents its options; usage errors exit 2."""

from __future__ import annotations

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from mtrec.cli import app

runner = CliRunner()


def _commands(group, prefix=()):
    for name, cmd in group.commands.items():
        path = (*prefix, name)
        if hasattr(cmd, "commands"):
            yield from _commands(cmd, path)
        else:
            yield path, cmd


ALL = list(_commands(get_command(app)))


def test_design_commands_exist():
    names = {" ".join(p) for p, _ in ALL}
    for expected in ["data generate", "data load", "validate", "features", "train", "evaluate", "score", "run",
                     "backfill", "dq list", "dq show", "models list", "models show", "models promote",
                     "models rollback", "quickstart"]:
        assert expected in names


@pytest.mark.parametrize("path", [p for p, _ in ALL], ids=[" ".join(p) for p, _ in ALL])
def test_every_subcommand_help_describes_its_options(path):
    res = runner.invoke(app, [*path, "--help"])
    assert res.exit_code == 0, res.output
    cmd = dict(ALL)[path]
    assert cmd.help and cmd.help.strip()
    for param in cmd.params:
        if param.param_type_name == "option":
            assert param.help, f"{' '.join(path)} {param.opts[0]} has no help"
            assert param.opts[0] in res.output


def test_bad_date_is_a_usage_error():
    res = runner.invoke(app, ["validate", "--date", "2024-13-01"])
    assert res.exit_code == 2
