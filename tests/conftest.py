"""Shared fixtures: a small toy world written once per session, and one local Ray instance."""

from __future__ import annotations

import pytest
import torch

from blip2.toyworld.corpus import ToyWorldConfig, write_toyworld

SMALL_WORLD = ToyWorldConfig(seed=3, web_size=300, clean_size=60, val_size=40, test_size=40, novel_size=30,
                             shard_size=128)


@pytest.fixture(scope="session")
def small_world(tmp_path_factory):
    """A small toy world on disk (WebDataset + Parquet), with its summary."""
    root = tmp_path_factory.mktemp("toyworld")
    return root, write_toyworld(SMALL_WORLD, root)


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray instance for the whole session (starting one costs ~5 s and ~1 GB).

    More logical CPUs than the two cores: Ray Data read tasks must never be starved by actors
    (docs/ray-and-transformers-traps.md, the silent-deadlock trap). Serve runs on it as `blip2 serve` runs
    it: in Ray Serve's throughput mode, unless the environment says otherwise."""
    ray = pytest.importorskip("ray")
    from pipelines.common import OWN_CLUSTER_RUNTIME_ENV, serve_environment

    serve_environment()  # before Ray starts: its processes read it when they import Serve
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,  # never join a `ray start` cluster
             runtime_env=OWN_CLUSTER_RUNTIME_ENV)  # its workers know their cluster, not the `head` fixture's
    yield ray
    ray.shutdown()


@pytest.fixture
def one_thread():
    """Tiny models on a small shared machine: intra-op threads cost far more in contention than they
    save (measured about 5x slower with the default thread count)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
