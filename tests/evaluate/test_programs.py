"""Generated programs run sandboxed: a right one passes, a wrong one fails, and none can hurt the machine."""

from __future__ import annotations

import os
import shutil
import time

import pytest

from flowertune_llm.evaluate import programs, sandbox

NAMESPACES = pytest.mark.skipif(sandbox.isolation() != "namespaces", reason="user namespaces are not available here")


def run(program: str, tmp_path, language: str = "python") -> programs.Result:
    return programs.run_program(program, language, tmp_path / "program")


def test_a_correct_python_solution_passes_and_a_wrong_one_fails(tmp_path):
    tests = "\nassert add(2, 3) == 5\n"
    assert run("def add(a, b):\n    return a + b\n" + tests, tmp_path / "a").passed
    wrong = run("def add(a, b):\n    return a - b\n" + tests, tmp_path / "b")
    assert not wrong.passed and "AssertionError" in wrong.status


def test_python_runs_as_the_harness_execs_it_with_empty_globals(tmp_path):
    # exec(source, {}) finds __name__ in builtins: a __main__ block does not run, as in the harness.
    assert run("if __name__ == '__main__':\n    raise SystemExit(1)\nassert __name__ == 'builtins'\n", tmp_path).passed


def test_an_infinite_loop_is_stopped_at_its_time_limit(tmp_path):
    started = time.monotonic()
    result = run("while True:\n    pass\n", tmp_path)
    assert result.status == "timed out" and time.monotonic() - started < programs.PYTHON_SECONDS + 3


@NAMESPACES
def test_a_program_cannot_open_a_network_connection(tmp_path):
    result = run("import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=2)\n", tmp_path)
    assert not result.passed and "Network is unreachable" in result.status


@NAMESPACES
def test_a_program_writes_only_inside_its_own_directory(tmp_path):
    outside = tmp_path / "outside.txt"
    program = f"import os\nopen('inside.txt', 'w').write('ok')\nopen(os.path.expanduser('~/home.txt'), 'w').write('ok')\nopen({str(outside)!r}, 'w').write('x')\n"
    result = run(program, tmp_path)
    assert not result.passed and "Read-only file system" in result.status
    assert not outside.exists()
    assert (tmp_path / "program" / "inside.txt").read_text() == "ok" and (tmp_path / "program" / "home.txt").exists()


@NAMESPACES
def test_a_fork_bomb_is_contained_and_nothing_it_started_survives(tmp_path):
    def mine() -> int:
        return sum(1 for pid in os.listdir("/proc") if pid.isdigit())

    before = mine()
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    assert run(bomb, tmp_path / "bomb").status == "timed out"
    daemon = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n"  # escapes its session
    assert run(daemon, tmp_path / "daemon").passed
    time.sleep(0.5)
    assert mine() <= before + 2  # what the programs started died with their PID namespace


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_javascript_passes_on_exit_status_zero(tmp_path):
    tests = "\nconst assert = require('node:assert');\nassert.deepEqual(add(2, 3), 5);\n"
    assert run("function add(a, b) { return a + b; }" + tests, tmp_path / "a", "js").passed
    assert not run("function add(a, b) { return a - b; }" + tests, tmp_path / "b", "js").passed


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not installed")
def test_cpp_compiles_then_runs_and_a_compile_error_fails(tmp_path):
    tests = "\n}\nint main() { assert(add(2, 3) == 5); }\n"
    assert run("#include<assert.h>\nlong add(long a, long b) {\n    return a + b;" + tests, tmp_path / "a", "cpp").passed
    assert not run("#include<assert.h>\nlong add(long a, long b) {\n    return a - b;" + tests, tmp_path / "b", "cpp").passed
    broken = run("long add(long a, long b) {\n    return a +;" + tests, tmp_path / "c", "cpp")
    assert not broken.passed and broken.status.startswith("compile error")


def test_a_missing_tool_skips_its_language_with_the_reason(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert programs.missing_tool("js") == "node is not installed: MultiPL-E js programs cannot run here"
    assert programs.missing_tool("python") is None


def test_pass_at_1_is_the_share_of_problems_that_passed(tmp_path):
    results = programs.run_all(["assert 1 == 1\n", "assert 1 == 2\n", "x = 1\n", "raise SystemExit(3)\n"], "python", workers=2)
    assert [r.passed for r in results] == [True, False, True, False]
    assert programs.pass_at_1(results) == 0.5
