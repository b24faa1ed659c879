"""Build hook only; every piece of metadata is in pyproject.toml.

The recipes stay at the repository's top level (``tasks/``, ``configs/``, ``scripts/bench_*.py``); the wheel
carries a copy of them as the package data folder ``moeparadigms/_recipes/``, found at run time by
:func:`moeparadigms.recipes.root`. An editable install copies nothing: there the recipes are read from the checkout.
"""
from __future__ import annotations

import os
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

RECIPES = ("tasks/**/*.yaml", "configs/**/*.yaml", "scripts/bench_*.py")


class BuildPyWithRecipes(build_py):
    """``build_py`` plus one package-data entry: the top-level recipes, written under ``moeparadigms/_recipes``."""

    def _get_data_files(self):
        data_files = super()._get_data_files()
        root = Path.cwd()  # setuptools runs the build from the project (or unpacked sdist) folder
        names = sorted({p.relative_to(root).as_posix() for pattern in RECIPES for p in root.glob(pattern) if p.is_file()})
        if not any(n.startswith("tasks/") for n in names):
            raise RuntimeError(f"no recipes under {root}/tasks: the wheel would ship without them")
        data_files.append(("moeparadigms._recipes", str(root), os.path.join(self.build_lib, "moeparadigms", "_recipes"), names))
        return data_files


setup(cmdclass={"build_py": BuildPyWithRecipes})
