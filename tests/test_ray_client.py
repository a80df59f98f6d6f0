"""Joining a cluster through Ray Client (`--bn-ray-address ray://...`) where its server fails to start a
connection's server, as Ray's proxy does now and then on a busy machine: tried again, then one clear error.
Runs without Ray (a stand-in for the module), so in the README's test command."""

from __future__ import annotations

import pytest

from bnsuite.executor import ExecutorError, join


class _FlakyClient:
    """A stand-in for the `ray` module whose Ray Client server fails to start a connection's server `failures`
    times, as Ray's proxy does on a busy machine."""

    def __init__(self, failures: int):
        self.failures, self.calls = failures, []

    def init(self, **options):
        self.calls.append(options)
        if len(self.calls) <= self.failures:
            raise ConnectionAbortedError("Initialization failure from server: Starting Ray client server failed.")


def test_joining_through_ray_client_tries_again_where_its_server_failed_to_start(capsys):
    ray = _FlakyClient(failures=2)
    join(ray, "ray://head:10001", pause_s=0, log_to_driver=False)
    assert [call["address"] for call in ray.calls] == ["ray://head:10001"] * 3
    assert all(call["log_to_driver"] is False for call in ray.calls)
    assert "trying again (3 of 3)" in capsys.readouterr().err


def test_joining_through_ray_client_gives_up_with_one_error_after_its_attempts():
    ray = _FlakyClient(failures=3)
    with pytest.raises(ExecutorError, match=r"ray://head:10001.*failed to start this connection's server 3 times"):
        join(ray, "ray://head:10001", pause_s=0)
    assert len(ray.calls) == 3


def test_joining_a_cluster_by_its_head_address_is_not_tried_again():
    ray = _FlakyClient(failures=1)
    with pytest.raises(ConnectionAbortedError):
        join(ray, "10.0.0.1:6379", pause_s=0)
    assert len(ray.calls) == 1
