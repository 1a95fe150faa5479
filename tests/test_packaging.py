"""What an installed fidelity offers besides its commands: version, ``python -m fidelity``,
licence metadata, type information, the exit status of a bug, and readable output files."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import zipfile
from importlib import metadata, resources
from pathlib import Path

import numpy as np
import pytest

import fidelity
from fidelity import cli
from fidelity.core.cache import ArtifactCache
from fidelity.core.errors import FidelityError

REPO = Path(__file__).resolve().parents[1]


def test_version_and_python_m_fidelity(capsys):
    with pytest.raises(SystemExit) as stopped:
        cli.main(["--version"])
    assert stopped.value.code == 0
    assert capsys.readouterr().out.strip() == f"fidelity {fidelity.__version__}"
    completed = subprocess.run(
        [sys.executable, "-m", "fidelity", "--version"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=120,
    )
    assert completed.returncode == 0
    assert completed.stdout.strip() == f"fidelity {fidelity.__version__}"


def test_licence_and_type_information_ship_with_the_packages():
    assert metadata.metadata("influence-fidelity")["License-Expression"] == "MIT"
    assert "MIT License" in (REPO / "LICENSE").read_text()
    for package in ("fidelity", "fidelity.estimators", "fidelity.retrain", "fidelity.reports"):
        assert resources.files(package).joinpath("py.typed").is_file()


@pytest.mark.slow
def test_the_wheel_installs_one_import_namespace(tmp_path):
    """pip install influence-fidelity adds the package fidelity and nothing else at the top
    level (no generic estimators/, retrain/ or reports/ beside other distributions')."""
    # From a copy of the working tree: an in-place build keeps build/lib, whose stale files
    # (a package that moved) a later wheel would take in.
    source = tmp_path / "source"
    shutil.copytree(
        REPO,
        source,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", ".ci-venv", ".peers-venv", "build", "runs", "*.egg-info", "__pycache__"
        ),
    )
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(source),
            "--no-deps",
            "--no-build-isolation",
            "--quiet",
            "--wheel-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr
    (wheel,) = tmp_path.glob("influence_fidelity-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    assert {name.split("/")[0] for name in names} == {
        "fidelity",
        f"influence_fidelity-{fidelity.__version__}.dist-info",
    }
    for package in ("fidelity", "fidelity/estimators", "fidelity/retrain", "fidelity/reports"):
        assert f"{package}/py.typed" in names
    assert "fidelity/results.schema.json" in names and "fidelity/suites/nightly.toml" in names


def test_a_bug_exits_3_with_one_line_and_the_traceback_in_a_file(tmp_path, capsys, monkeypatch):
    def broken(_args):
        raise ZeroDivisionError("an internal mistake")

    monkeypatch.setattr(cli, "command_list", broken)
    monkeypatch.setenv("FIDELITY_CRASH_DIR", str(tmp_path))
    assert cli.main(["list"]) == cli.INTERNAL_ERROR == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "internal error" in err and "ZeroDivisionError: an internal mistake" in err
    (log,) = tmp_path.glob("fidelity-crash-*.txt")
    assert str(log) in err
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "in broken" in text
    assert f"fidelity {fidelity.__version__}" in text


def test_bad_input_is_still_2_not_3(capsys, monkeypatch):
    def refused(_args):
        raise FidelityError("a wrong input")

    monkeypatch.setattr(cli, "command_list", refused)
    assert cli.main(["list"]) == 2
    assert capsys.readouterr().err == "fidelity: error: a wrong input\n"


@pytest.mark.skipif(os.name != "posix", reason="POSIX modes")
def test_written_files_are_readable_by_others_as_plain_files_are(tmp_path):
    cache = ArtifactCache(tmp_path / "cache")
    cache.save("theta_s", "0" * 64, {"theta": np.zeros(3)})
    (entry,) = (p for p in (tmp_path / "cache").rglob("*.npz"))
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert stat.S_IMODE(entry.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)


def test_import_paths_resolve_from_the_working_directory(tmp_path):
    # The console script's sys.path starts with its bin/ folder, not the project directory.
    (tmp_path / "myproject_problems.py").write_text(
        "from tests.conftest import make_tiny_logreg\n\n"
        "def mine():\n    return make_tiny_logreg(n_train=110)\n"
    )
    script = Path(sys.executable).with_name("fidelity")
    if not script.is_file():
        pytest.skip("the fidelity console script is not installed next to this python")
    completed = subprocess.run(
        [
            str(script),
            "run",
            "smoke",
            "--problem",
            "myproject_problems:mine",
            "--no-cache",
            "--no-history",
            "--out",
            str(tmp_path / "run"),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    assert (tmp_path / "run" / "results.json").is_file()
