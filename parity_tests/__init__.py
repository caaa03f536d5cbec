"""Parity between danet_torch and danet_keras: reference, tolerances, harness, CLI and tests."""
