"""``ast.parse`` one thread at a time on the CPython versions whose AST constructor races (python/cpython#106905)."""

from __future__ import annotations

import ast
import inspect
import threading

import numpy as np

from modalkit import ast_guard


def test_the_versions_with_the_race_are_3_11_0_to_3_11_7_and_3_12_0() -> None:
    versions = [(3, 10, 13), (3, 11, 0), (3, 11, 7), (3, 11, 8), (3, 12, 0), (3, 12, 1)]
    assert [ast_guard.affected(v) for v in versions] == [False, True, True, False, True, False]


def test_once_installed_a_parse_waits_while_another_thread_parses_and_parsing_still_works() -> None:
    ast_guard.install()
    ast_guard.install()  # twice: wrapped once
    if not ast_guard.affected():
        assert not getattr(ast.parse, "__modalkit_guarded__", False)
        return
    assert ast.parse.__wrapped__.__module__ == "ast"  # type: ignore[attr-defined]
    finished = threading.Event()
    with ast_guard._LOCK:  # as if another thread were in the middle of a parse
        parser = threading.Thread(target=lambda: (ast.literal_eval("{'descr': '<f8'}"), finished.set()))
        parser.start()
        assert not finished.wait(0.3)  # NumPy's header parse waits for it
    assert finished.wait(5)
    parser.join()
    assert str(inspect.signature(np.add.reduce)).startswith("(")  # a builtin's signature is parsed from text
