"""The user's road from a wheel: build it offline, install it without dependencies into a temporary folder and,
from a working directory outside the repository, list the recipes, copy one out and train from it.

Plus the recipe commands themselves (``moeparadigms recipes ls|cp|path``) on the source checkout.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from moeparadigms import recipes
from moeparadigms.cli import BENCHMARKS

REPO = Path(__file__).resolve().parent.parent
# what a build needs; copied so that the build writes its build/ and egg-info into a temporary folder, not the checkout
SOURCES = ("moeparadigms", "tasks", "configs", "scripts", "pyproject.toml", "setup.py", "MANIFEST.in", "README.md",
           "LICENSE", "CHANGELOG.md")
RECIPE_GLOBS = ("tasks/**/*.yaml", "configs/**/*.yaml", "scripts/bench_*.py")


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd} exited {r.returncode}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The project's wheel, built offline (no index, no build isolation: the venv's setuptools builds it)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "_recipes")
    for name in SOURCES:
        p = REPO / name
        if p.is_dir():
            shutil.copytree(p, src / name, ignore=ignore)
        elif p.exists():
            shutil.copy2(p, src / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", str(tmp / "dist"), str(src)], cwd=tmp, timeout=180)
    (whl,) = (tmp / "dist").glob("moeparadigms-*.whl")
    return whl


@pytest.fixture(scope="module")
def installed(wheel: Path) -> Path:
    """The wheel installed without dependencies into a folder of its own (the venv supplies torch & co.)."""
    site = wheel.parent.parent / "site"
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site), str(wheel)],
         cwd=wheel.parent, timeout=120)
    return site


def _user_env(site: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    env["PYTHONPATH"] = str(site)  # ahead of the venv's editable install of the checkout
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def test_wheel_carries_every_recipe_license_and_marker(wheel: Path):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"moeparadigms/_recipes/{p.relative_to(REPO).as_posix()}" for g in RECIPE_GLOBS for p in REPO.glob(g)}
    assert expected and expected <= names, sorted(expected - names)[:10]
    assert "moeparadigms/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    import moeparadigms

    assert f"\nVersion: {moeparadigms.__version__}\n" in meta  # one version source: the package's __version__
    assert "\nLicense-Expression: Apache-2.0\n" in meta


def test_recipe_runs_from_installed_wheel(installed: Path, tmp_path: Path):
    env, user = _user_env(installed), tmp_path / "user"
    user.mkdir()
    py = sys.executable
    where = _run([py, "-c", "import moeparadigms.recipes as r, moeparadigms.cli as c; "
                  "print(r.__file__); print(r.root()); print(c._scripts_dir())"], cwd=user, env=env).stdout.split()
    shipped = installed / "moeparadigms" / "_recipes"
    assert Path(where[0]).is_relative_to(installed), where  # the wheel's copy, not the checkout's
    assert Path(where[1]) == shipped and Path(where[2]) == shipped / "scripts"
    assert all((shipped / "scripts" / s).is_file() for s in BENCHMARKS.values())  # `moeparadigms bench` finds them

    ls = _run([py, "-m", "moeparadigms.cli", "recipes", "ls"], cwd=user, env=env).stdout
    assert "tasks/supervised/digits.yaml" in ls and "configs/rl/ppo_moe.yaml" in ls and str(shipped) in ls

    _run([py, "-m", "moeparadigms.cli", "recipes", "cp", "supervised", "."], cwd=user, env=env)
    assert (user / "tasks/supervised/digits.yaml").read_bytes() == (REPO / "tasks/supervised/digits.yaml").read_bytes()

    _run([py, "-m", "moeparadigms.cli", "fit", "--config", "tasks/supervised/digits.yaml",
          "--config", "configs/supervised/moe_mlp.yaml", "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
          "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false"], cwd=user, env=env, timeout=240)
    assert list(user.glob("lightning_logs/version_0/checkpoints/last.ckpt")), sorted(map(str, user.rglob("*")))[:30]


# --- the recipe commands on the source checkout (editable install: the recipes are the repository's own) ----------

def test_checkout_reads_recipes_from_the_repository():
    assert recipes.root() == REPO and recipes.scripts_dir() == REPO / "scripts"
    listed = recipes.list_recipes()
    on_disk = {p.relative_to(REPO).as_posix() for g in RECIPE_GLOBS[:2] for p in REPO.glob(g)}
    assert {f for files in listed.values() for f in files} == on_disk
    assert listed["supervised"] == ["tasks/supervised/digits.yaml", "configs/supervised/moe_mlp.yaml"]
    assert set(recipes.paradigms()) >= {"continual", "meta", "multitask", "rl", "supervised"}


def test_cp_paradigm_file_and_folder_keep_the_layout(tmp_path: Path):
    written = recipes.copy("meta", tmp_path)
    assert {w.relative_to(tmp_path).as_posix() for w in written} == set(recipes.list_recipes("meta")["meta"])
    one = recipes.copy("configs/rl/ppo_moe.yaml", tmp_path / "b")
    assert one == [tmp_path / "b/configs/rl/ppo_moe.yaml"]
    folder = recipes.copy("configs/rl", tmp_path / "c")
    assert len(folder) == len(list((REPO / "configs/rl").glob("*.yaml")))
    assert recipes.copy("meta", tmp_path) == written  # identical files: copying again is fine


def test_cp_refuses_to_overwrite_a_changed_file_unless_forced(tmp_path: Path):
    target = tmp_path / "tasks/supervised/digits.yaml"
    target.parent.mkdir(parents=True)
    target.write_text("# mine\n")
    with pytest.raises(ValueError, match="differ.*--force"):
        recipes.copy("supervised", tmp_path)
    assert target.read_text() == "# mine\n" and not (tmp_path / "configs").exists()  # nothing written
    recipes.copy("supervised", tmp_path, force=True)
    assert target.read_bytes() == (REPO / "tasks/supervised/digits.yaml").read_bytes()


@pytest.mark.parametrize("argv, match", [
    (["ls", "nope"], r"unknown paradigm 'nope'; choose one of \[.*'supervised'"),
    (["cp", "../etc/passwd", "x"], r"'../etc/passwd' is not a recipe"),
    (["cp", "tasks/supervised/missing.yaml", "x"], r"no recipe 'tasks/supervised/missing.yaml'"),
    (["cp", "supervised"], r"cp needs PARADIGM\|PATH and DEST"),
    (["frob"], r"unknown command 'frob'; choose one of \['ls', 'cp', 'path'\]"),
    (["ls", "--all"], r"unknown option '--all'"),
])
def test_bad_input_is_one_value_error(argv, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        recipes.main([a if a != "x" else str(tmp_path / "x") for a in argv])


def test_cli_prints_listing_and_one_line_errors(tmp_path: Path):
    exe = [sys.executable, "-m", "moeparadigms.cli", "recipes"]
    out = _run([*exe, "ls", "supervised"], cwd=tmp_path).stdout
    assert "tasks/supervised/digits.yaml" in out and "configs/rl" not in out
    assert _run([*exe, "path", "--scripts"], cwd=tmp_path).stdout.strip() == str(REPO / "scripts")
    r = subprocess.run([*exe, "ls", "nope"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.splitlines()[0].startswith("moeparadigms: error: recipes: unknown paradigm 'nope'")
