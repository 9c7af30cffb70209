"""CLI conventions (issue 14, item 14): help text with allowed values on every option, `--version`
on each console script, and an `evaluate --help` that names its sub-commands without importing the
heavy stack."""

from __future__ import annotations

import argparse
import importlib.metadata
import subprocess
import sys

import pytest

from eval import cli as eval_cli
from ingest import cli as ingest_cli
from training import cli as train_cli

VERSION = importlib.metadata.version("scgpt-census")


def _parsers() -> dict[str, argparse.ArgumentParser]:
    out = {"ingest": ingest_cli._parser(), "train": train_cli.build_parser(),
           "evaluate": eval_cli._parser(False), "evaluate suite": eval_cli._parser(True),
           "evaluate gep": eval_cli._gep_parser()}
    for name, p in list(out.items()):  # sub-commands
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for sub, sp in a.choices.items():
                    out[f"{name} {sub}"] = sp
    return out


def _options(p: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {(a.option_strings[-1] if a.option_strings else a.dest): a for a in p._actions
            if not isinstance(a, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction))}


def test_every_option_has_help():
    missing = [f"{name} {opt}" for name, p in _parsers().items() for opt, a in _options(p).items()
               if not a.help or not str(a.help).strip()]
    assert not missing, f"options without help text: {missing}"


@pytest.mark.parametrize("cmd, opt, needles", [
    ("ingest census", "--n-bins", ["3", "256", "51"]),
    ("ingest census", "--cells-per-shard", [">= 1", "10000"]),
    ("ingest census", "--seed", ["integer", "0"]),
    ("ingest census", "--organism", ["Homo sapiens", "Mus musculus"]),
    ("ingest census", "--val-fraction", ["[0, 1)", "0.03"]),
    ("ingest census", "--min-genes", [">= 0"]),
    ("ingest synth-census", "--seed", ["integer"]),
    ("ingest build-census", "--organism", ["Homo sapiens"]),
    ("train pretrain", "--seed", ["integer"]),
    ("train pretrain", "--batch-size", [">= 1"]),
    ("evaluate", "--seed", ["integer", "0"]),
    ("evaluate", "--device", ["cpu", "cuda", "auto"]),
    ("evaluate gep", "--seed", ["integer"]),
])
def test_help_names_allowed_values(cmd, opt, needles):
    a = _options(_parsers()[cmd])[opt]
    text = a.help % {"default": a.default, "choices": a.choices} if "%(" in a.help else a.help
    for n in needles:
        assert n in text, f"{cmd} {opt}: help {text!r} does not name {n!r}"


@pytest.mark.parametrize("opt, values", [
    ("--zero-stage", ["1", "2", "3"]),
    ("--precision", ["auto", "fp32", "bf16"]),
    ("--optimizer", ["torch", "cpu_adam", "fused_adam"]),
])
def test_train_enumerated_options_list_their_values(opt, values):
    a = _options(_parsers()["train pretrain"])[opt]
    assert a.metavar == "{" + ",".join(values) + "}"
    assert all(v in a.help for v in values)


@pytest.mark.parametrize("main", [ingest_cli.main, train_cli.main, eval_cli.main])
def test_version(main, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert VERSION in capsys.readouterr().out


def test_evaluate_help_names_subcommands_and_stays_light():
    code = ("import sys\nfrom eval import cli\n"
            "try:\n    cli.main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "heavy = sorted(m for m in ('torch', 'pandas', 'anndata', 'mlflow', 'scanpy') if m in sys.modules)\n"
            "print('HEAVY', heavy)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "evaluate suite" in r.stdout and "evaluate gep" in r.stdout
    assert "HEAVY []" in r.stdout


def test_evaluate_task_names_match_tasks_module():
    from eval import tasks

    assert eval_cli.TASKS == tasks.TASKS
    assert set(eval_cli.TASKS) == {t for t, _ in tasks.SUITE}
