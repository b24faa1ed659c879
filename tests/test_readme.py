"""README.md, executed: every fenced code block runs as a user would run it, or is skipped by a named rule.

* ```python blocks run verbatim in a fresh interpreter, in a temporary working directory.
* ```bash blocks run command by command with bash, each block in a temporary working directory of its own where
  ``tasks/`` and ``configs/`` link to the checkout's (the README's commands are written for the checkout's root),
  so a block's later commands see what its earlier ones wrote (``lightning_logs/version_0/...``).
* Time: the rules below append a few documented overrides to training commands (``SHORT``: one short epoch, a
  handful of batches, tiny evaluations) and write ``/tmp/...`` outputs into the test's temporary folder.
  Nothing else is changed: a README command that fails here fails for a user too.

Every block must match exactly one rule in ``PYTHON_BLOCKS`` / ``COMMAND_RULES``: a new block or command without a
rule fails ``test_every_readme_block_has_a_rule`` (and its own test), and so does a rule that matches nothing.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"


# --------------------------------------------------------------------------------------------------- the README
@dataclass(frozen=True)
class Block:
    index: int
    lang: str
    line: int  # 1-based line of the opening fence
    code: str


def readme_blocks(text: str | None = None) -> list[Block]:
    """The fenced code blocks, in order. An unclosed fence raises ``ValueError``."""
    lines = (README.read_text(encoding="utf-8") if text is None else text).splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = re.match(r"^(\s*)```(\S*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        start, lang, body = i + 1, m.group(2), []
        i += 1
        while i < len(lines) and not re.match(r"^\s*```\s*$", lines[i]):
            body.append(lines[i])
            i += 1
        if i == len(lines):
            raise ValueError(f"README.md line {start}: code fence never closed")
        blocks.append(Block(len(blocks), lang, start, "\n".join(body) + "\n"))
        i += 1
    return blocks


def shell_commands(code: str) -> list[str]:
    """A bash block's commands: backslash continuations joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", code)
    out = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            out.append(shlex.join(words))
    return out


# --------------------------------------------------------------------------------------------------- the rules
# python blocks, keyed by a line the block contains: all run verbatim (the value says what the block is)
PYTHON_BLOCKS = {
    "from moeparadigms.core import MoE, TopKRouter, MLPExperts, remap_optimizer": "the core in ten lines",
    "from moeparadigms.integrations.avalanche import AvalancheMoE, MoELossPlugin": "MoE inside Avalanche's Replay",
}

# appended to every fit/validate/test/predict command, by the paradigm of its task YAML (tasks/<paradigm>/...):
# a short epoch and tiny evaluations, so the whole README runs in a few minutes
SHORT_ALL = ["--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1",
             "--trainer.limit_predict_batches=1"]
SHORT = {
    "supervised": ["--trainer.max_epochs=1"],
    "multitask": ["--trainer.max_epochs=1"],
    "continual": ["--data.init_args.n_experiences=2", "--data.init_args.epochs_per_experience=1"],  # the stream sets max_epochs
    "meta": ["--data.init_args.num_test_tasks=4", "--data.init_args.eval_batch_size=4", "--trainer.val_check_interval=1"],
    "rl": ["--data.init_args.total_steps=2048", "--model.init_args.eval_episodes=1"],
}


def _paradigm(cmd: str) -> str:
    m = re.search(r"--config[ =]tasks/(\w+)/", cmd)
    if not m or m.group(1) not in SHORT:
        raise AssertionError(f"README command names no task YAML of a known paradigm {sorted(SHORT)}: {cmd}")
    return m.group(1)


def _shortened(cmd: str, extra: tuple[str, ...] = ()) -> str:
    return " ".join([cmd, *SHORT_ALL, *SHORT[_paradigm(cmd)], *extra])


@dataclass
class Run:
    """What a command left behind, for a rule's check."""
    cmd: str
    cwd: Path
    tmp: Path
    out: str  # stdout + stderr
    before: set[Path]  # run directories (lightning_logs/version_N) before the command


def _new_runs(r: Run) -> list[Path]:
    return sorted(set(r.cwd.glob("lightning_logs/version_*")) - r.before)


def _check_fit(r: Run) -> None:
    runs = _new_runs(r)
    assert len(runs) == 1 and (runs[0] / "checkpoints/last.ckpt").is_file(), f"no new run with last.ckpt: {runs}"


def _check_resumed(r: Run) -> None:
    """``--ckpt_path last`` continues the newest run in its own directory: it restores version_0's last.ckpt,
    trains the second epoch there (no new run directory holds checkpoints) and logs both epochs in one CSV."""
    import torch

    assert re.search(r"Restoring states from the checkpoint path at \S*version_0/checkpoints/last\.ckpt", r.out), \
        "--ckpt_path last did not restore the newest run's last.ckpt"
    ck = torch.load(r.cwd / "lightning_logs/version_0/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert ck["epoch"] == 1, f"the resumed run should end after its second epoch, last.ckpt says epoch {ck['epoch']}"
    assert not any((d / "checkpoints").is_dir() for d in _new_runs(r)), "the resumed run opened a new run directory"
    epochs = {row.split(",")[0] for row in (r.cwd / "lightning_logs/version_0/metrics.csv").read_text().splitlines()[1:]}
    assert {"0", "1"} <= epochs, f"version_0/metrics.csv should hold both epochs, has {sorted(epochs)}"


def _check_predict(r: Run) -> None:
    files = sorted(r.cwd.glob("lightning_logs/*/predictions.pt"))
    assert files, "predict wrote no lightning_logs/*/predictions.pt"


def _check_help(r: Run) -> None:
    for cmd in ("fit", "validate", "test", "predict", "bench", "evaluate", "recipes"):
        assert f"\n  {cmd} " in r.out, f"{cmd} missing from moeparadigms --help"


def _check_bench(r: Run) -> None:
    out = Path(shlex.split(r.cmd)[shlex.split(r.cmd).index("--out") + 1])
    assert out.is_file() and json.loads(out.read_text()), f"bench wrote no JSON at {out}"


def _check_recipes_cp(r: Run) -> None:
    paradigm = shlex.split(r.cmd)[3]
    assert list((r.cwd / "tasks" / paradigm).glob("*.yaml")) and list((r.cwd / "configs" / paradigm).glob("*.yaml"))


def _check_evaluate(r: Run) -> None:
    words = shlex.split(r.cmd)
    if "--video-dir" in words:
        videos = r.cwd / words[words.index("--video-dir") + 1]
        assert list(videos.rglob("*.mp4")), f"no video in {videos}"


@dataclass
class Rule:
    name: str  # in the test id
    pattern: str  # re.search on the command as written in the README
    skip: str = ""  # reason: the command is not run
    rewrite: Callable[[str], str] = lambda c: c
    check: Callable[[Run], None] | None = None
    timeout: float = 240
    xfail: str = ""  # a known failure whose fix needs code (strict: the test says when it is fixed)


COMMAND_RULES = [
    Rule("make-test", r"^make test$", skip="make test is the command that runs this test"),
    Rule("make-demo", r"^make demo$", skip="make's install step plus a 2-minute benchmark; its --quick form runs in "
                              "tests/continual/test_cli_and_bench.py"),
    Rule("help", r"^moeparadigms --help$", check=_check_help, timeout=60),
    Rule("recipes-cp", r"^moeparadigms recipes cp ", check=_check_recipes_cp, timeout=60),
    Rule("recipes", r"^moeparadigms recipes ", timeout=60),
    Rule("fit-resume", r"^moeparadigms fit .*--ckpt_path last\b", rewrite=lambda c: _shortened(c, ("--trainer.max_epochs=2",)),
         check=_check_resumed),
    Rule("fit-ddp", r"^moeparadigms fit .*--trainer\.strategy=ddp", rewrite=_shortened, check=_check_fit, timeout=300),
    Rule("fit", r"^moeparadigms fit ", rewrite=_shortened, check=_check_fit),
    Rule("predict", r"^moeparadigms predict ", rewrite=_shortened, check=_check_predict),
    Rule("test", r"^moeparadigms (validate|test) ", rewrite=_shortened),
    Rule("bench-core", r"^moeparadigms bench core --quick", check=_check_bench, timeout=120),
    Rule("bench", r"^moeparadigms bench \w+ --quick", check=_check_bench, timeout=240),
    Rule("evaluate", r"^moeparadigms evaluate ", check=_check_evaluate),
]


def rule_for(cmd: str) -> Rule:
    matches = [r for r in COMMAND_RULES if re.search(r.pattern, cmd)]
    if not matches:
        raise AssertionError(f"README command without a rule in tests/test_readme.py COMMAND_RULES: {cmd}")
    return matches[0]


def python_key(block: Block) -> str:
    keys = [k for k in PYTHON_BLOCKS if k in block.code.splitlines()]
    if len(keys) != 1:
        raise AssertionError(f"README.md line {block.line}: python block matches {len(keys)} PYTHON_BLOCKS keys "
                             f"(need exactly one): add a rule to tests/test_readme.py")
    return keys[0]


# --------------------------------------------------------------------------------------------------- the tests
def test_every_readme_block_has_a_rule():
    blocks = readme_blocks()
    assert blocks, "README.md has no code blocks"
    used_python, used_rules = [], set()
    for b in blocks:
        assert b.lang in ("python", "bash"), f"README.md line {b.line}: block language {b.lang!r} has no runner"
        if b.lang == "python":
            used_python.append(python_key(b))
        else:
            for cmd in shell_commands(b.code):
                used_rules.add(COMMAND_RULES.index(rule_for(cmd)))
    assert sorted(used_python) == sorted(PYTHON_BLOCKS), "each PYTHON_BLOCKS key must match exactly one block"
    unused = [COMMAND_RULES[i].pattern for i in range(len(COMMAND_RULES)) if i not in used_rules]
    assert not unused, f"rules that match no README command (stale): {unused}"


def test_block_parser_and_rules_reject_what_they_should():
    text = "x\n```bash\nmoeparadigms fit --config tasks/rl/a.yaml \\\n   --config c.yaml  # hi\n\nmake test\n```\n"
    (b,) = readme_blocks(text)
    assert (b.lang, b.line) == ("bash", 2)
    assert shell_commands(b.code) == ["moeparadigms fit --config tasks/rl/a.yaml --config c.yaml", "make test"]
    with pytest.raises(ValueError, match="never closed"):
        readme_blocks("```python\nprint(1)\n")
    with pytest.raises(AssertionError, match="without a rule"):
        rule_for("rm -rf lightning_logs")
    with pytest.raises(AssertionError, match="matches 0 PYTHON_BLOCKS"):
        python_key(Block(0, "python", 1, "import os\n"))


def _cases() -> list:
    cases = []
    for b in readme_blocks():
        if b.lang == "python":
            cases.append(pytest.param(b, None, id=f"python-L{b.line}"))
            continue
        for i, cmd in enumerate(shell_commands(b.code)):
            marks, name = [], "no-rule"
            try:
                rule = rule_for(cmd)
                name = rule.name
            except AssertionError:
                rule = None  # the test itself fails, naming the command
            if rule is not None and rule.xfail:
                marks.append(pytest.mark.xfail(strict=True, reason=rule.xfail))
            m = re.search(r"--config[ =]tasks/(\w+)/", cmd) or re.search(r"^moeparadigms bench (?!core)(\w+)", cmd)
            cases.append(pytest.param(b, i, id=f"{name}{'-' + m.group(1) if m else ''}-L{b.line}.{i}", marks=marks))
    return cases


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory) -> Callable[[Block], Path]:
    dirs: dict[int, Path] = {}

    def get(block: Block) -> Path:
        if block.index not in dirs:
            d = tmp_path_factory.mktemp(f"readme_block{block.index}")
            for name in ("tasks", "configs"):
                (d / name).symlink_to(REPO / name, target_is_directory=True)
            dirs[block.index] = d
        return dirs[block.index]

    return get


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the venv's moeparadigms
    env.setdefault("MPLBACKEND", "Agg")
    return env


@pytest.mark.parametrize("block, index", _cases())
def test_readme(block: Block, index: int | None, workdirs, tmp_path: Path):
    cwd = workdirs(block)
    if block.lang == "python":
        python_key(block)
        script = tmp_path / "block.py"
        script.write_text(block.code)
        r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, f"README.md line {block.line}: python block failed\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
        return
    written = shell_commands(block.code)[index]
    rule = rule_for(written)
    if rule.skip:
        pytest.skip(f"README command {written!r}: {rule.skip}")
    cmd = rule.rewrite(written).replace("/tmp/", f"{tmp_path}/")
    before = set(cwd.glob("lightning_logs/version_*"))
    try:
        r = subprocess.run(["bash", "-c", cmd], cwd=cwd, env=_env(), capture_output=True, text=True,
                           timeout=rule.timeout)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"README.md line {block.line}: `{written}` did not finish in {rule.timeout:.0f} s "
                             f"(run as: {cmd})") from e
    out = r.stdout + r.stderr
    assert r.returncode == 0, (f"README.md line {block.line}: `{written}` exited {r.returncode} (run as: {cmd})\n"
                               f"{out[-5000:]}")
    assert "Traceback (most recent call last)" not in out, f"`{written}` printed a traceback:\n{out[-5000:]}"
    if rule.check is not None:
        rule.check(Run(cmd, cwd, tmp_path, out, before))
