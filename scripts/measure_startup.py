"""Start-up time of the command line and the package imports, each in fresh Python processes.

    python scripts/measure_startup.py --out benchmarks/results/startup.json   # median of 7 runs per command
    python scripts/measure_startup.py --quick                                 # smoke test: 1 run each

Every command runs ``--repeats`` times in a new process (wall time around ``subprocess.run``; the commands take turns,
so a change in machine load hits all of them alike); the record keeps every time, the median and the target:

* ``moeparadigms --help`` (the console script next to this interpreter): target < 1.5 s;
* ``python -c "import moeparadigms"``;
* ``python -c "import moeparadigms.core"``: target < 4 s;
* references without a target: ``python -c pass`` (the interpreter alone) and ``python -c "import torch"``.

The package commands are also run once under a wrapper that lists which heavy packages (torch, Lightning,
torchmetrics, jsonargparse, ...) they imported: ``--help`` should import none of them. Load average and CPU count are recorded beside
the times, since on a shared machine they move the numbers. ``--check`` exits 1 when a target is missed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

HEAVY = ("torch", "pytorch_lightning", "lightning", "lightning_fabric", "torchmetrics", "jsonargparse", "omegaconf",
         "gymnasium", "avalanche", "matplotlib", "sklearn", "tensorboard")
# prints the heavy top-level packages a snippet imported, as JSON on the last stdout line
_PROBE = ("import json, sys\n{code}\n"
          "print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({heavy!r}))))")


def _console_script() -> list[str]:
    exe = Path(sys.executable).parent / "moeparadigms"
    found = str(exe) if exe.is_file() else shutil.which("moeparadigms")
    if found is None:
        raise FileNotFoundError("the moeparadigms console script is not installed next to this Python nor on PATH "
                                "(pip install -e .)")
    return [found]


def commands() -> list[dict]:
    """What is timed: name, argv, the code the import probe runs for it (None: not probed) and the target in seconds
    (None: a reference without a target)."""
    py = sys.executable
    return [
        {"name": "python -c pass", "argv": [py, "-c", "pass"], "probe": None, "target_s": None},
        {"name": "moeparadigms --help", "argv": [*_console_script(), "--help"],
         "probe": "import contextlib, io\nfrom moeparadigms.cli import main\n"
                  "with contextlib.redirect_stdout(io.StringIO()):\n    main(['--help'])",
         "target_s": 1.5},
        {"name": "import moeparadigms", "argv": [py, "-c", "import moeparadigms"], "probe": "import moeparadigms",
         "target_s": None},
        {"name": "import moeparadigms.core", "argv": [py, "-c", "import moeparadigms.core"],
         "probe": "import moeparadigms.core", "target_s": 4.0},
        {"name": "import torch", "argv": [py, "-c", "import torch"], "probe": None, "target_s": None},
    ]


def heavy_imports(code: str, timeout: float = 300) -> list[str]:
    """The heavy packages (``HEAVY``) that running ``code`` in a fresh interpreter imports."""
    r = subprocess.run([sys.executable, "-c", _PROBE.format(code=code, heavy=HEAVY)], capture_output=True, text=True,
                       timeout=timeout, cwd=os.getcwd())
    if r.returncode != 0:
        raise RuntimeError(f"import probe failed ({r.returncode}): {r.stderr.strip().splitlines()[-1:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _time_once(argv: list[str], timeout: float) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=timeout)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {r.returncode}: {r.stderr.strip()[-500:]}")
    return dt


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def measure(repeats: int, timeout: float = 300) -> dict:
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    cmds = commands()
    times: dict[str, list[float]] = {c["name"]: [] for c in cmds}
    load_before = os.getloadavg()
    for _ in range(repeats):  # round robin: load changes during the run hit every command alike
        for c in cmds:
            times[c["name"]].append(round(_time_once(c["argv"], timeout), 4))
    load_after = os.getloadavg()
    results = []
    for c in cmds:
        t = times[c["name"]]
        med = statistics.median(t)
        results.append({
            "name": c["name"], "argv": [Path(c["argv"][0]).name, *c["argv"][1:]], "times_s": t,
            "median_s": round(med, 4), "min_s": min(t), "target_s": c["target_s"],
            "met": None if c["target_s"] is None else med < c["target_s"],
            "heavy_imports": None if c["probe"] is None else heavy_imports(c["probe"], timeout),
        })
    return {
        "what": "start-up wall time of fresh processes (scripts/measure_startup.py)",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "repeats": repeats,
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "loadavg_before": [round(x, 2) for x in load_before],
                    "loadavg_after": [round(x, 2) for x in load_after]},
        "versions": {d: _version(d) for d in ("moeparadigms", "torch", "pytorch-lightning", "torchmetrics")},
        "results": results,
    }


def table(record: dict) -> str:
    lines = ["| command | median (s) | min (s) | target | met | heavy packages imported |", "|---|---|---|---|---|---|"]
    for r in record["results"]:
        target = f"< {r['target_s']} s" if r["target_s"] is not None else "-"
        met = {None: "-", True: "yes", False: "**no**"}[r["met"]]
        lines.append(f"| `{r['name']}` | {r['median_s']:.2f} | {r['min_s']:.2f} | {target} | {met} | "
                     f"{'-' if r['heavy_imports'] is None else ', '.join(r['heavy_imports']) or 'none'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=7, help="fresh processes per command (the median is reported)")
    p.add_argument("--quick", action="store_true", help="smoke test: 1 repetition")
    p.add_argument("--out", type=Path, help="write the JSON record here")
    p.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    a = p.parse_args(argv)
    record = measure(1 if a.quick else a.repeats)
    print(table(record))
    m = record["machine"]
    print(f"\n{record['repeats']} run(s) per command; load average {m['loadavg_before'][0]} -> {m['loadavg_after'][0]} "
          f"on {m['cpus']} CPUs")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {a.out}")
    if a.check and any(r["met"] is False for r in record["results"]):
        raise SystemExit(1)
    return record


if __name__ == "__main__":
    main()
