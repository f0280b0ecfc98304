"""`--strategy=multi_worker` with two real worker processes on localhost (a chief and a worker, one TF_CONFIG each).

Both workers train the smoke model; a one-process run with the same global batch and seed is the reference. The
runs agree to float rounding because every random draw of a training step is keyed by (seed, step, the image's
place in the global batch) and the data is sharded by DATA (see `DiffusionModel.training_draws` and
`keras_ddpm.data.pipeline._sharding_options`).
"""

import contextlib
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

REPO = pathlib.Path(__file__).resolve().parents[1]
SMOKE_ARGS = ["--flagfile=flags/smoke.flags", "--train_steps=10", "--steps_per_epoch=5", "--validation_images=0"]
ITERATIONS = "optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE"  # the step counter in a checkpoint
TIMEOUT = 600  # seconds for any one launch; the two cores of a CI machine may be shared

pytestmark = pytest.mark.slow


def free_ports(count):
    """`count` distinct free loopback ports (held open together, so they differ)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def worker_environments():
    """TF_CONFIG-carrying environments of a chief and a worker; the package imported is the checkout under test."""
    chief_port, worker_port = free_ports(2)
    cluster = {"chief": [f"127.0.0.1:{chief_port}"], "worker": [f"127.0.0.1:{worker_port}"]}
    base = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    return [
        {**base, "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": task_type, "index": 0}})}
        for task_type in ("chief", "worker")
    ]


class Processes:
    """Started subprocesses with their stderr in files; `wait()` fails with each one's stderr tail."""

    def __init__(self, log_dir):
        self.log_dir = pathlib.Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.started = []  # (name, Popen, stderr path)

    def start(self, name, command, env):
        stderr_path = self.log_dir / f"{name}.stderr"
        with open(self.log_dir / f"{name}.stdout", "w") as stdout, open(stderr_path, "w") as stderr:
            process = subprocess.Popen(command, cwd=REPO, env=env, stdout=stdout, stderr=stderr)
        self.started.append((name, process, stderr_path))
        return process

    def tails(self):
        return "\n".join(
            f"--- {name} (exit {process.poll()}), end of stderr:\n{path.read_text()[-2500:]}"
            for name, process, path in self.started
        )

    def wait(self, timeout=TIMEOUT):
        deadline = time.time() + timeout
        for name, process, _ in self.started:
            try:
                process.wait(timeout=max(deadline - time.time(), 1))
            except subprocess.TimeoutExpired:
                pytest.fail(f"{name} did not finish within {timeout} s.\n{self.tails()}")
        failed = [name for name, process, _ in self.started if process.returncode != 0]
        assert not failed, f"{failed} failed.\n{self.tails()}"

    def kill_all(self):
        for _, process, _ in self.started:
            if process.poll() is None:
                process.kill()
                process.wait()

    def stdout(self, name):
        return (self.log_dir / f"{name}.stdout").read_text()


@pytest.fixture
def processes(tmp_path):
    started = Processes(tmp_path / "logs")
    try:
        yield started
    finally:
        started.kill_all()


def start_train_workers(processes, run_dir, *args):
    train = [sys.executable, str(REPO / "train.py"), *SMOKE_ARGS, f"--output_dir={run_dir}", "--strategy=multi_worker"]
    for name, env in zip(("chief", "worker"), worker_environments()):
        processes.start(name, [*train, *args], env)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A two-worker run and a one-process run of the same 10 steps, trained side by side."""
    root = tmp_path_factory.mktemp("multi_worker")
    started = Processes(root / "logs")
    extra = ["--swd_every_epochs=1", "--swd_images=32"]  # the SWD callback runs on both workers too
    try:
        start_train_workers(started, root / "two_workers", *extra)
        started.start(
            "one_process",
            [sys.executable, str(REPO / "train.py"), *SMOKE_ARGS, f"--output_dir={root / 'one_process'}",
             "--strategy=one_device", *extra],
            {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""},
        )
        started.wait()
    finally:
        started.kill_all()
    return root / "two_workers", root / "one_process"


def checkpoint_tensors(run_dir):
    path = tf.train.latest_checkpoint(str(run_dir / "checkpoints"))
    reader = tf.train.load_checkpoint(path)
    return {name: reader.get_tensor(name) for name, _ in tf.train.list_variables(path) if "VARIABLE_VALUE" in name}


def test_two_workers_train_the_same_weights_as_one_process(runs):
    two_workers, one_process = (checkpoint_tensors(run) for run in runs)
    assert two_workers.keys() == one_process.keys()
    differences = {
        name: float(np.abs(two_workers[name] - one_process[name]).max())
        for name in one_process
        if one_process[name].dtype.kind == "f"
    }
    worst = max(differences, key=differences.get)
    print(f"max abs weight difference, two workers vs one process: {differences[worst]:.3g} ({worst})")
    # Float rounding only: the gradient is summed as 8 + 8 images instead of 16 (measured: ~1e-7). Clipping each
    # replica's share instead of the global gradient (Keras' default) moved weights by 3e-4.
    assert differences[worst] < 1e-5, worst
    assert int(two_workers[ITERATIONS]) == 10


def read_log(run_dir):
    import csv

    with open(run_dir / "log.csv") as file:
        return list(csv.DictReader(file))


def test_only_the_chief_writes_the_run_directory(runs):
    two_workers, one_process = runs
    expected = {"config.json", "checkpoints", "log.csv", "loss.png", "samples", "tensorboard", "savedmodel",
                "best_ema.weights.h5", "best_ema.json"}
    assert {path.name for path in two_workers.iterdir()} == expected  # no workertemp_* folder left behind
    assert {path.name for path in one_process.iterdir()} == expected
    rows = read_log(two_workers)
    assert [int(row["step"]) for row in rows] == [5, 10]  # one writer: each epoch logged once
    for mine, reference in zip(rows, read_log(one_process)):
        assert float(mine["loss"]) == pytest.approx(float(reference["loss"]), abs=1e-5)
    assert sorted(path.name for path in (two_workers / "samples").iterdir()) == ["step_0000005.png", "step_0000010.png"]


def test_the_export_is_the_same_kind_of_savedmodel(runs):
    two_workers, one_process = (tf.saved_model.load(str(run / "savedmodel" / "1")) for run in runs)
    assert sorted(two_workers.signatures) == sorted(one_process.signatures) == ["denoise", "generate", "serving_default"]
    for name, signature in one_process.signatures.items():
        assert two_workers.signatures[name].structured_input_signature == signature.structured_input_signature
        assert two_workers.signatures[name].structured_outputs == signature.structured_outputs
    seeds = tf.constant([1, 2, 3], tf.int64)
    images_two = two_workers.signatures["serving_default"](seed=seeds)["images"].numpy()
    images_one = one_process.signatures["serving_default"](seed=seeds)["images"].numpy()
    assert np.abs(images_two.astype(int) - images_one.astype(int)).max() <= 1
    metadata = [json.loads(model.metadata().numpy()) for model in (two_workers, one_process)]
    assert metadata[0]["training_steps"] == metadata[1]["training_steps"] == 10


SHARD_PROBE = """
import json, os, sys
import tensorflow as tf
# The strategy comes first (before any other TensorFlow work); without TF_CONFIG the probe is one plain process.
strategy = tf.distribute.MultiWorkerMirroredStrategy() if "TF_CONFIG" in os.environ else None
from keras_ddpm.data import make_dataset
dataset = make_dataset(**json.loads(sys.argv[1]))
if strategy is None:
    replicas, images = 1, next(iter(dataset)).numpy()
else:
    batch = next(iter(strategy.experimental_distribute_dataset(dataset)))
    replicas, images = strategy.num_replicas_in_sync, strategy.experimental_local_results(batch)[0].numpy()
print(json.dumps({"replicas": replicas, "images": images.reshape(len(images), -1).tolist()}))
"""


@pytest.mark.parametrize("name", ["synthetic", pytest.param("celeba", marks=pytest.mark.celeba)])
def test_workers_split_each_global_batch_and_read_different_images(name, processes, request):
    """Each worker gets its half of the one-process global batch (DATA sharding): different images, none shared.

    The one-process batch comes from a fresh process too: in the test process an earlier test's global seed
    would change the shuffle.
    """
    data_dir = str(request.getfixturevalue("celeba_dir")) if name == "celeba" else None
    arguments = dict(name=name, image_size=16, batch_size=8, data_dir=data_dir, seed=3, cache=None, num_images=64)
    chief_env, worker_env = worker_environments()
    single_env = {key: value for key, value in chief_env.items() if key != "TF_CONFIG"}
    for task, env in (("chief", chief_env), ("worker", worker_env), ("single", single_env)):
        processes.start(task, [sys.executable, "-c", SHARD_PROBE, json.dumps(arguments)], env)
    processes.wait()
    reports = [json.loads(processes.stdout(task).strip().splitlines()[-1]) for task in ("chief", "worker", "single")]
    assert [report["replicas"] for report in reports] == [2, 2, 1]
    chief, worker, global_batch = (np.array(report["images"], np.float32) for report in reports)
    assert len(chief) == len(worker) == 4, "a global batch of 8 on 2 replicas gives each 4 images"
    np.testing.assert_array_equal(chief, global_batch[:4])
    np.testing.assert_array_equal(worker, global_batch[4:])
    assert not {row.tobytes() for row in chief} & {row.tobytes() for row in worker}


def wait_for(condition, processes, what, timeout=TIMEOUT):
    deadline = time.time() + timeout
    while not condition():
        running = all(process.poll() is None for _, process, _ in processes.started)
        if not running or time.time() > deadline:
            pytest.fail(f"waiting for {what}: {'a process ended' if not running else 'timed out'}.\n{processes.tails()}")
        time.sleep(0.5)


def test_sigkill_of_a_worker_then_restart_of_both_resumes_at_the_last_checkpoint(processes, tmp_path):
    run_dir = tmp_path / "run"
    endless = ["--train_steps=1000", "--export=false", "--sample_every_epochs=1000"]
    start_train_workers(processes, run_dir, *endless)
    wait_for(lambda: (run_dir / "checkpoints" / "ckpt-10.index").exists(), processes, "the chief's second checkpoint")
    chief, worker = (process for _, process, _ in processes.started)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    chief.kill()  # without its peer the chief cannot take another step; a cluster manager restarts both
    chief.wait()
    saved_path = tf.train.latest_checkpoint(str(run_dir / "checkpoints"))
    saved_step = int(tf.train.load_checkpoint(saved_path).get_tensor(ITERATIONS))
    assert saved_step >= 10 and saved_step % 5 == 0

    restarted = Processes(tmp_path / "restart_logs")
    try:
        start_train_workers(restarted, run_dir, *endless[1:], f"--train_steps={saved_step + 5}")
        restarted.wait()
    finally:
        restarted.kill_all()
    steps = [int(row["step"]) for row in read_log(run_dir)]
    print(f"killed after the checkpoint of step {saved_step}; log steps after the restart: {steps}")
    # Rows logged past the checkpoint before the kill are dropped on resume, so each step appears once.
    assert steps == list(range(5, saved_step + 6, 5)), "one epoch from the checkpoint, not a new run"
    assert f"Epoch {saved_step // 5 + 1}/{saved_step // 5 + 1}" in restarted.stdout("chief")
    resumed = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(run_dir / "checkpoints")))
    assert int(resumed.get_tensor(ITERATIONS)) == saved_step + 5
    assert not list(run_dir.glob("workertemp_*"))
