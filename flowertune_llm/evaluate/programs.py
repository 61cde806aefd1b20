"""pass@1 by running each generated program against its tests, as the harness does, in the sandbox.

How each language runs and what counts as a pass (bigcode-evaluation-harness fork ``3ff8ee00``):

* **Python** (HumanEval, MBPP): ``completion + "\\n" + tests`` is ``exec``-uted with an empty globals dict
  (so ``__name__`` is unset) under a 3-second timer (``execute.py``); a pass is no exception in time.
* **JavaScript** (MultiPL-E): ``node program.js``, 5 seconds; a pass is exit status 0.
* **C++** (MultiPL-E): ``g++ program.cpp -o program -std=c++17`` (no optimisation), 15 seconds, then the
  program, 15 seconds; a pass is both exiting 0.

With one sample per problem pass@1 is the share of problems whose program passed. The harness scores
MultiPL-E by globbing every ``*.results.json`` in the system temporary directory, so files left by an
earlier run count too; here each run scores exactly its own programs (what the harness gives on a clean
temporary directory).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from flowertune_llm.evaluate import sandbox

PYTHON_SECONDS, JS_SECONDS, CPP_SECONDS = 3.0, 5.0, 15.0
# The harness's timer, then exec with empty globals; anything raised is a failure (exit 1).
_PYTHON_RUNNER = (
    "import signal, sys\n"
    "source = open('program.py').read()\n"
    "signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(TimeoutError('timed out')))\n"
    f"signal.setitimer(signal.ITIMER_REAL, {PYTHON_SECONDS})\n"
    "exec(compile(source, 'program.py', 'exec'), {})\n"
)
TOOLS = {"js": "node", "cpp": "g++"}


@dataclass(frozen=True)
class Result:
    passed: bool
    status: str  # passed | failed | timed out | compile error, with the tail of the output when it failed


def missing_tool(language: str) -> str | None:
    """Why programs of ``language`` cannot run here (their dataset is then skipped, never scored 0), or None."""
    tool = TOOLS.get(language)
    if tool and shutil.which(tool) is None:
        return f"{tool} is not installed: MultiPL-E {language} programs cannot run here"
    return None


def _verdict(outcome: sandbox.Outcome, what: str = "failed") -> Result:
    if outcome.ok:
        return Result(True, "passed")
    if outcome.timed_out:
        return Result(False, "timed out")
    return Result(False, f"{what} (exit {outcome.returncode}): {outcome.output.strip()[-300:]}")


def run_program(program: str, language: str, directory: Path, memory_mb: int = 2048) -> Result:
    """Run one program (the completion followed by its tests) in ``directory``, which it may write."""
    directory.mkdir(parents=True)
    if language == "python":
        (directory / "program.py").write_text(program)
        # exec's own timer stops it at 3 s; the sandbox's wall limit is the harness's join(timeout + 1).
        outcome = sandbox.run([sys.executable, "-I", "-c", _PYTHON_RUNNER], directory, sandbox.Limits(PYTHON_SECONDS + 1, memory_mb))
        if outcome.returncode == 1 and "TimeoutError: timed out" in outcome.output:
            return Result(False, "timed out")
        return _verdict(outcome)
    if language == "js":
        (directory / "program.js").write_text(program)
        return _verdict(sandbox.run(["node", "program.js"], directory, sandbox.Limits(JS_SECONDS, memory_mb)))
    if language == "cpp":
        (directory / "program.cpp").write_text(program)
        compiled = sandbox.run(["g++", "program.cpp", "-o", "program", "-std=c++17"], directory, sandbox.Limits(CPP_SECONDS, memory_mb))
        if not compiled.ok:
            return _verdict(compiled, "compile error")
        return _verdict(sandbox.run(["./program"], directory, sandbox.Limits(CPP_SECONDS, memory_mb)))
    raise ValueError(f"no runner for {language!r} programs")


def run_all(programs: Sequence[str], language: str, *, workers: int | None = None,
            progress: Callable[[], None] | None = None) -> list[Result]:  # fmt: skip
    """Each program in its own directory, ``workers`` at a time; results in the programs' order."""
    with tempfile.TemporaryDirectory(prefix="flowertune-eval-") as scratch:
        root = Path(scratch)

        def one(index: int) -> Result:
            result = run_program(programs[index], language, root / f"p{index:05d}")
            if progress:
                progress()
            return result

        with ThreadPoolExecutor(max_workers=workers or 4) as pool:
            return list(pool.map(one, range(len(programs))))


def pass_at_1(results: Sequence[Result]) -> float:
    return sum(r.passed for r in results) / len(results) if results else 0.0
