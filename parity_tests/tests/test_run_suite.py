"""The suite runner's own choices: its runs, each process's environment, its argument checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from parity_tests import run_suite


def test_each_process_gets_its_backend_and_thread_counts_unless_set():
    env = run_suite._environment("jax", 3, base={"PATH": "/bin", "OMP_NUM_THREADS": "8", "KERAS_BACKEND": "torch"})
    assert env["KERAS_BACKEND"] == "jax" and env["PATH"] == "/bin"
    assert env["OMP_NUM_THREADS"] == "8"  # the user's setting wins
    assert {name: env[name] for name in run_suite.THREAD_VARIABLES if name != "OMP_NUM_THREADS"} == {
        "MKL_NUM_THREADS": "3", "TF_NUM_INTRAOP_THREADS": "3", "TF_NUM_INTEROP_THREADS": "3"}


@pytest.mark.parametrize("argv, message", [
    (["--jobs", "0"], "`--jobs` must be >= 1, got 0"),
    (["--threads", "0"], "`--threads` must be >= 1, got 0"),
    (["--backends", "tensorflow,theano"], "`--backends` has ['theano']; accepted: ['jax', 'tensorflow', 'torch']"),
])
def test_bad_arguments_are_named(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_suite.main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_runs_longest_first_short_last_each_test_once():
    runs = run_suite._runs(["tensorflow", "jax", "torch"], slow=False)
    assert [(label, backend, marks) for label, backend, marks, _ in runs] == [
        ("Keras tests on jax", "jax", "keras and not slow"),
        ("tests without Keras", "tensorflow", "not keras and not slow"),
        ("Keras tests on tensorflow", "tensorflow", "keras and not slow"),
        ("Keras tests on torch", "torch", "keras and not slow"),
        ("tests without Keras in test_torch_distributed.py, test_torch_train.py", "tensorflow",
         "not keras and not slow")]
    last = [str(Path(run_suite.TESTS) / name) for name in run_suite.LAST]
    assert all(Path(p).is_file() for p in last)
    assert [paths for *_, paths in runs] == [[run_suite.TESTS], [run_suite.TESTS, *(f"--ignore={p}" for p in last)],
                                             [run_suite.TESTS], [run_suite.TESTS], last]
    assert run_suite._runs([], slow=True)[0][2] == "not keras"
