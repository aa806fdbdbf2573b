"""Shared fixtures: `test_hosts(n)` makes N SSH-reachable hosts on this machine (root only)."""

import os

import pytest

from migrate.testhosts import TestHosts


@pytest.fixture
def test_hosts():
    """Factory: `hosts = test_hosts(2)`; every set it made is torn down after the test.

    A teardown that leaves something behind fails the test, so leaks are seen, not piled up.
    """
    if os.geteuid() != 0:
        pytest.skip("test hosts need root")
    made: list[TestHosts] = []

    def make(n: int = 2, **kwargs) -> TestHosts:
        hosts = TestHosts(n, **kwargs)
        made.append(hosts)
        return hosts

    yield make
    errors = []
    for hosts in made:
        try:
            hosts.teardown()
        except RuntimeError as e:
            errors.append(str(e))
    if errors:
        pytest.fail("; ".join(errors))
