"""The suite runner's own choices: each process's environment and its argument checks."""

from __future__ import annotations

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
