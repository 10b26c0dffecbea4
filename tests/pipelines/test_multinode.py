"""Training over a two-node Ray cluster on one machine (``ray.cluster_utils.Cluster``): the workers are
spread over both worker nodes, one node is removed mid-run, and the job still finishes from its last
checkpoint. Runs in its own process (a test session's Ray instance cannot also be a multi-node cluster),
started as the session's collection ends (``early_process``, tests/conftest.py)."""

import json
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

SCRIPT = textwrap.dedent('''
    import json, sys, threading, time
    from pathlib import Path

    import psutil
    import ray
    from ray.cluster_utils import Cluster

    from blip2.config import load_config
    from blip2.training.config import Stage1Config
    from pipelines import train

    tmp = Path(sys.argv[1])
    gate = tmp / "node-removed"

    def hold_after_first_checkpoint():
        """Every Ray worker process's start-up hook: its workers know this cluster (as the jobs' own hook
        does), and a training worker waits after its first report (step 5, checkpointed) until the node is gone, so
        the removal lands mid-run however slowly this background process is scheduled. Without it the 35
        steps left could finish between the driver seeing the checkpoint and removing the node (seen once
        in CI: the run never restarted)."""
        import ray.train
        from pipelines.common import know_own_cluster

        know_own_cluster()
        report = ray.train.report

        def held(metrics, *args, **kwargs):
            report(metrics, *args, **kwargs)
            waited = time.monotonic()
            while not gate.exists() and time.monotonic() - waited < 600:  # the restarted run passes at once
                time.sleep(0.1)

        ray.train.report = held

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})  # schedules only
    # 2 CPUs a node: a train worker and a Ray Data read task fit on each, before and after the removal
    nodes = [cluster.add_node(num_cpus=2, wait=False) for _ in range(3)]
    cluster.wait_for_nodes(timeout=1800)  # the default 30 s each is short at this process's priority (below)
    ray.init(address=cluster.address, runtime_env={"worker_process_setup_hook": hold_after_first_checkpoint})
    config = load_config(Stage1Config, None, [
        f"storage_path={tmp / 'runs'}", f"toyworld={tmp / 'world'}", "world.web_size=40", "world.clean_size=64",
        "world.val_size=10", "world.test_size=32", "world.novel_size=10", "model.hidden_size=64",
        "model.num_layers=1", "model.image_text_hidden_size=32", "model.num_query_tokens=4", "optim.batch_size=8",
        "optim.warmup_steps=1", "optim.max_steps=40", "checkpoint_every=5", "log_every=10",
        "feature_cache=false", "scaling.num_workers=2", "scaling.cpus_per_worker=1",
        "scaling.placement_strategy=STRICT_SPREAD", "max_failures=2", "name=multinode",
        # streamed, as the cluster presets run: with materialize_data=true the removed node's held blocks were
        # rebuilt (Ray resubmitted 8 lost objects' tasks) and once the run outlasted the join below (400 s then)
        "materialize_data=false"])
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("output", train.fit("stage1", config)))
    thread.start()

    def hosts():
        """The nodes whose raylet has a Ray Train worker among its descendants."""
        found = []
        for node in nodes:
            raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
            if any("RayTrainWorker" in " ".join(p.cmdline()) for p in raylet.children(recursive=True)):
                found.append(node)
        return found

    run = tmp / "runs" / "multinode"
    # generous: this process runs at the lowest priority (SCHED_IDLE) and gets no CPU while the tests keep
    # both cores busy; the test's own wait bounds it
    deadline = time.time() + 1800
    while time.time() < deadline:
        snapshot = run / "checkpoint_manager_snapshot.json"
        if snapshot.exists() and json.loads(snapshot.read_text()).get("latest_checkpoint_result"):
            break
        time.sleep(0.2)
    spread = len(hosts())
    removed = hosts()[0]
    cluster.remove_node(removed, allow_graceful=False)
    gate.touch()
    thread.join(timeout=1800)
    report = json.loads((outcome["output"] / "report.json").read_text())
    print("RESULT " + json.dumps({"spread": spread, "steps": report["steps"], "started_at": report["started_at"],
                                  "nodes_alive": len([n for n in ray.nodes() if n["Alive"]])}))
    ray.shutdown()
    cluster.shutdown()
''')


def multinode_command(directory: Path) -> list[str]:
    return [sys.executable, "-c", SCRIPT, str(directory)]


@pytest.mark.early_process(command=multinode_command)  # started as collection ends, run beside the other tests
def test_training_spreads_over_nodes_and_survives_losing_one(early_process):
    code, output = early_process.wait(timeout=2400)  # from its start, early in the session
    lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    assert code == 0 and lines, output[-4000:]
    outcome = json.loads(lines[-1].removeprefix("RESULT "))
    assert outcome["spread"] == 2, outcome  # one worker on each of two nodes
    assert outcome["steps"] == 40
    assert len(outcome["started_at"]) == 2 and outcome["started_at"][1] > 0  # resumed from a checkpoint
    assert outcome["nodes_alive"] == 3  # head + the two nodes left
