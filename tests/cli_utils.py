"""Run an entry point (``examples/*.py``, ``tools/*.py``) inside the test process and collect its one-line errors."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from kvpo_megatron.cli import exit_code

ROOT = Path(__file__).resolve().parent.parent


def load_script(name: str):
    """The module of a script under the repository root (``examples/generate.py``)."""
    spec = importlib.util.spec_from_file_location(f"_entry_{Path(name).stem}", ROOT / name)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_cli(capsys, monkeypatch, script: str, *argv) -> tuple[int, list[str]]:
    """(exit code, ``error:`` lines on stderr) of ``script argv...``: tools through their ``main(argv)``, examples
    through ``cli.exit_code(main)`` with ``sys.argv`` set (what ``run_main`` does, minus process-group teardown)."""
    capsys.readouterr()
    mod = load_script(script)
    if script.startswith("tools/"):
        code = mod.main(list(argv))
    else:
        monkeypatch.setattr(sys, "argv", [script, *argv])
        code = exit_code(mod.main)
    err = capsys.readouterr().err
    return code, [ln for ln in err.splitlines() if ln.startswith("error:")]


def one_error(code: int, errors: list[str], *needles: str) -> None:
    """Exit code 2 and exactly one ``error:`` line containing every needle."""
    assert code == 2, (code, errors)
    assert len(errors) == 1, errors
    for n in needles:
        assert n in errors[0], errors[0]
