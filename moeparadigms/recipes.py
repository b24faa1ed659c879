"""The shipped recipes: task YAMLs (``tasks/<paradigm>/*.yaml``: what to solve), method YAMLs
(``configs/<paradigm>/*.yaml``: how) and the benchmark scripts (``scripts/bench_*.py``).

In a source checkout (and an editable install) they are the repository's top-level ``tasks/``, ``configs/`` and
``scripts/``; a wheel carries a copy of them as ``moeparadigms/_recipes/`` (written by ``setup.py`` at build time).
:func:`root` finds whichever is there, so the same commands work in both::

    moeparadigms recipes ls [PARADIGM]          # the task and method YAMLs, one paradigm or all
    moeparadigms recipes cp PARADIGM|PATH DEST  # copy them out, keeping the tasks/ and configs/ layout
    moeparadigms recipes path [--scripts]       # where they are

After ``moeparadigms recipes cp supervised .`` the README's commands run unchanged from ``.``
(``moeparadigms fit --config tasks/supervised/digits.yaml --config configs/supervised/moe_mlp.yaml``).
This module imports only the standard library: listing recipes never loads torch.
"""
from __future__ import annotations

import filecmp
import shutil
import sys
from pathlib import Path

__all__ = ["root", "scripts_dir", "paradigms", "list_recipes", "copy", "main"]

KINDS = ("tasks", "configs")  # the two YAML folders, each split by paradigm
_PACKAGE_DIR = Path(__file__).resolve().parent
_SHIPPED = _PACKAGE_DIR / "_recipes"  # the copy inside a wheel
_CHECKOUT = _PACKAGE_DIR.parent  # the repository root of a source checkout / editable install

USAGE = """usage: moeparadigms recipes <command>

  ls [PARADIGM]          list the task and method YAMLs (of one paradigm, or all)
  cp PARADIGM|PATH DEST  copy a paradigm's YAMLs, one YAML or a folder (e.g. configs/rl) into DEST,
                         keeping the tasks/ and configs/ layout; --force overwrites files that differ
  path [--scripts]       print the folder holding tasks/ and configs/ (--scripts: the benchmark scripts)

Then, from DEST:  moeparadigms fit --config tasks/<paradigm>/<task>.yaml --config configs/<paradigm>/<method>.yaml"""


def _is_recipe_root(p: Path) -> bool:
    return all((p / k).is_dir() for k in KINDS)


def root() -> Path:
    """The folder that holds ``tasks/``, ``configs/`` and ``scripts/``: the wheel's ``moeparadigms/_recipes`` if
    present, else the source checkout's top level. Raises ``FileNotFoundError`` when neither has them."""
    for candidate in (_SHIPPED, _CHECKOUT):
        if _is_recipe_root(candidate):
            return candidate
    raise FileNotFoundError(f"no recipes found: neither {_SHIPPED} nor {_CHECKOUT} holds tasks/ and configs/ "
                            "(reinstall moeparadigms from its wheel, or run from a source checkout)")


def scripts_dir() -> Path:
    """The folder of the benchmark scripts (``bench_<paradigm>.py``) run by ``moeparadigms bench``."""
    return root() / "scripts"


def paradigms() -> list[str]:
    """The paradigms that have task or method YAMLs, sorted."""
    r = root()
    return sorted({d.name for k in KINDS for d in (r / k).iterdir() if d.is_dir() and any(d.glob("*.yaml"))})


def _check_paradigm(paradigm: str) -> None:
    known = paradigms()
    if paradigm not in known:
        raise ValueError(f"recipes: unknown paradigm {paradigm!r}; choose one of {known}")


def list_recipes(paradigm: str | None = None) -> dict[str, list[str]]:
    """``{paradigm: [relative YAML paths]}``: the paradigm's task files first, then its method files, each sorted.
    ``paradigm=None`` lists every paradigm; an unknown one raises ``ValueError`` naming the known ones."""
    if paradigm is not None:
        _check_paradigm(paradigm)
    r = root()
    out: dict[str, list[str]] = {}
    for p in [paradigm] if paradigm is not None else paradigms():
        out[p] = [f.relative_to(r).as_posix() for k in KINDS for f in sorted((r / k / p).glob("*.yaml"))]
    return out


def _summary(path: Path) -> str:
    """The YAML's first comment line (every shipped recipe starts with one saying what it is)."""
    with path.open(encoding="utf-8") as f:
        first = f.readline().strip()
    return first.lstrip("#").strip() if first.startswith("#") else ""


def _sources(what: str) -> list[Path]:
    """The recipe files named by ``what``: a paradigm, or a YAML / folder path relative to the recipe root."""
    r = root()
    if "/" not in what and "\\" not in what and not what.endswith(".yaml"):
        _check_paradigm(what)
        return [r / f for f in list_recipes(what)[what]]
    rel = Path(what)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts or rel.parts[0] not in KINDS:
        raise ValueError(f"recipes: {what!r} is not a recipe; give a paradigm {paradigms()} or a path under "
                         f"{list(KINDS)} such as 'tasks/supervised/digits.yaml' (moeparadigms recipes ls)")
    src = r / rel
    if src.is_file() and src.suffix == ".yaml":
        return [src]
    if src.is_dir():
        files = sorted(src.rglob("*.yaml"))
        if files:
            return files
    raise ValueError(f"recipes: no recipe {what!r}; `moeparadigms recipes ls` lists them")


def copy(what: str, dest: str | Path, *, force: bool = False) -> list[Path]:
    """Copy the recipes named by ``what`` (a paradigm, a YAML or a folder such as ``configs/rl``) into ``dest``,
    keeping their ``tasks/<paradigm>/`` and ``configs/<paradigm>/`` paths, so the README's ``--config`` paths work
    from ``dest``. Returns the target files. A file already in ``dest`` with other content raises ``ValueError``
    (nothing is written) unless ``force=True``; an identical one is left as it is (so copying into the source
    checkout itself is a no-op)."""
    r = root()
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise ValueError(f"recipes: destination {str(dest)!r} is a file; give a folder")
    pairs = [(src, dest / src.relative_to(r)) for src in _sources(what)]
    same = {t for s, t in pairs if t.is_file() and filecmp.cmp(s, t, shallow=False)}  # also: dest is the recipe root
    clashes = [t for s, t in pairs if t.exists() and t not in same]
    if clashes and not force:
        raise ValueError(f"recipes: {len(clashes)} file(s) in {str(dest)!r} differ from the recipes, e.g. "
                         f"{str(clashes[0])!r}; pass --force to overwrite them")
    for src, target in pairs:
        if target not in same:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, target)
    return [t for _, t in pairs]


def main(argv: list[str]) -> None:
    """``moeparadigms recipes ls|cp|path``; a wrong command or argument raises ``ValueError`` (one line)."""
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    cmd, args = argv[0], list(argv[1:])
    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return
    force = "--force" in args if cmd == "cp" else False
    scripts = "--scripts" in args if cmd == "path" else False
    args = [a for a in args if not (force and a == "--force") and not (scripts and a == "--scripts")]
    unknown = [a for a in args if a.startswith("-")]
    if unknown:
        raise ValueError(f"recipes {cmd}: unknown option {unknown[0]!r} (moeparadigms recipes --help)")
    if cmd == "ls":
        if len(args) > 1:
            raise ValueError(f"recipes ls takes at most one paradigm, got {args}")
        r = root()
        print(f"recipes in {r}  (copy out with: moeparadigms recipes cp PARADIGM|PATH DEST)")
        for p, files in list_recipes(args[0] if args else None).items():
            print(f"\n{p}")
            width = max(len(f) for f in files)
            for f in files:
                print(f"  {f:<{width}}  {_summary(r / f)}".rstrip())
    elif cmd == "cp":
        if len(args) != 2:
            raise ValueError(f"recipes cp needs PARADIGM|PATH and DEST, got {args}")
        written = copy(args[0], args[1], force=force)
        print(f"{len(written)} recipe file(s) in {args[1]}:")
        for w in written:
            print(f"  {w}")
    elif cmd == "path":
        if args:
            raise ValueError(f"recipes path takes no arguments except --scripts, got {args}")
        print(scripts_dir() if scripts else root())
    else:
        raise ValueError(f"recipes: unknown command {cmd!r}; choose one of ['ls', 'cp', 'path']")


if __name__ == "__main__":  # python -m moeparadigms.recipes ...
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError) as e:
        print(f"moeparadigms: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
