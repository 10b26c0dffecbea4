"""The session's ``ray start --head`` (tests/pipelines/head.py), shared by the tests that submit jobs to a
cluster (the demo's submitted run starts a head of its own, beside the other tests)."""

import subprocess

import pytest

from tests.pipelines.head import Head

__all__ = ["finish"]


@pytest.fixture(scope="session")
def head(tmp_path_factory) -> Head:
    """``ray start --head --block`` in its own process group, on its own ports (a Ray instance already on
    the machine is neither used nor disturbed): stopping it stops exactly its processes. Started once,
    when a test first asks for it (about 10 s), and stopped at the end of the session."""
    try:
        started = Head.start(tmp_path_factory.mktemp("head") / "head.log")
    except RuntimeError as error:
        pytest.fail(str(error))
    yield started
    started.stop()


def finish(process: subprocess.Popen, timeout: float = 800) -> str:
    """Wait for a ``Head.submit`` (tests/pipelines/head.py); the job must have succeeded. Its output."""
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
        pytest.fail(f"the job did not end in {timeout} s:\n{stdout[-3000:]}{stderr[-3000:]}")
    assert process.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert "succeeded" in stdout.lower(), stdout[-3000:]
    return stdout

