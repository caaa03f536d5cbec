"""The test suite (``pytest --pyargs parity_tests``); shared helpers live in :mod:`parity_tests.tests.helpers`."""
