"""Multi-worker training on one machine: 2 CPU worker processes on localhost (TF_CONFIG, free ports) train the
classifier and the contrastive stage; both end with identical weights, equal to a single-process run over the same
global batch, and together they feed exactly the single-process global batches (periodic proportions included)."""
import dataclasses
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from mammodg.config import TrainConfig, VGGConfig, to_dict

TIMEOUT_S = 420  # both workers are killed after this

WORKER = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import keras
    from mammodg import stages
    from mammodg.config import TrainConfig, from_dict
    from mammodg.distributed import all_layers, distribute_batches, distribution_strategy

    args = json.loads(sys.argv[1])
    cfg = from_dict(TrainConfig, args["cfg"])
    strategy = distribution_strategy()
    model = stages.run(cfg.stage, cfg)
    bns = [l for l in all_layers(model) if isinstance(l, keras.layers.BatchNormalization)]
    arrays = {f"w{i}": keras.ops.convert_to_numpy(v) for i, v in enumerate(model.weights)}
    arrays |= {f"o{i}": keras.ops.convert_to_numpy(v) for i, v in enumerate(model.optimizer.variables)}
    np.savez(args["out"] + ".npz", **arrays)
    # what this worker feeds: the image ids of its slices of the first global batches of the sampled sequence
    from mammodg.records.reader import load_index
    from mammodg.records.schema import parse
    from mammodg.sampling.streams import make_plan, serialized_stream
    plan = make_plan(load_index(cfg.data_dir), cfg.data_dir, cfg.train_split, "periodic", cfg.seed)
    ids = serialized_stream(plan, seed=cfg.seed).map(lambda r: (parse(r)["image_id"], parse(r)["data_segment"]))
    fed, it = [], iter(distribute_batches(strategy, ids.batch(cfg.batch_size, drop_remainder=True)))
    for _ in range(args["id_steps"]):
        local = strategy.experimental_local_results(next(it))
        fed.append([[x.decode(), s.decode()] for part in local for x, s in zip(part[0].numpy(), part[1].numpy())])
    json.dump({"fed": fed, "replicas": strategy.num_replicas_in_sync,  # BN layers: one moving mean each
               "bn": sum(v.path.endswith("/moving_mean") for v in model.weights),
               "bn_synced": sum(bool(l.synchronized) for l in bns)}, open(args["out"] + ".json", "w"))
""")


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _launch(script: str, args_of, out: Path, workers: int, tag: str = "", env_of=None):
    """Start ``workers`` processes of ``script`` (1: a plain single process, no TF_CONFIG), process k with the JSON
    argument ``args_of(k)`` (and extra environment ``env_of(k)``), its log in ``out/worker<k><tag>.log``;
    returns (the file pattern ``out/{}<tag>``, the processes)."""
    out.mkdir(exist_ok=True)
    ports = _free_ports(workers)
    procs = []
    for k in range(workers):
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2", "OMP_NUM_THREADS": "1",
               **(env_of(k) if env_of else {})}
        env.pop("TF_CONFIG", None)
        if workers > 1:
            env["TF_CONFIG"] = json.dumps({"cluster": {"worker": [f"localhost:{p}" for p in ports]},
                                           "task": {"type": "worker", "index": k}})
        log = open(out / f"worker{k}{tag}.log", "w")
        procs.append(subprocess.Popen([sys.executable, "-c", script, json.dumps(args_of(k))], env=env, stdout=log,
                                      stderr=subprocess.STDOUT))
    return out / f"{{}}{tag}", procs


def _start(cfg, out: Path, workers: int, id_steps: int, tag: str = ""):
    """The classifier/contrastive worker (``WORKER``) on ``workers`` processes with run folder ``out/run``; their
    files are ``out/worker<k><tag>.*``."""
    cfg = dataclasses.replace(cfg, run_dir=str(out / "run"))
    return _launch(WORKER, lambda k: {"cfg": to_dict(cfg), "out": str(out / f"worker{k}{tag}"), "id_steps": id_steps},
                   out, workers, tag)


def _wait(runs, timeout_s: float = TIMEOUT_S) -> list[list[str]]:
    """Wait for every process (all are killed ``timeout_s`` after the first wait); each must exit 0. The logs."""
    deadline = time.monotonic() + timeout_s
    try:
        for _, procs in runs:
            for p in procs:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for _, procs in runs:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    all_logs = []
    for out, procs in runs:
        files = [str(out).format(f"worker{k}") for k in range(len(procs))]
        logs = [Path(f + ".log").read_text() for f in files]
        for k, p in enumerate(procs):
            assert p.returncode == 0, f"{files[k]} failed ({p.returncode}):\n" + logs[k][-4000:]
        all_logs.append(logs)
    return all_logs


def _finish(runs):
    """:func:`_wait`, then each worker's (arrays, info, log)."""
    results = []
    for (out, procs), logs in zip(runs, _wait(runs)):
        files = [str(out).format(f"worker{k}") for k in range(len(procs))]
        results.append([(dict(np.load(f + ".npz")), json.loads(Path(f + ".json").read_text()), log)
                        for f, log in zip(files, logs)])
    return results


def _compare(cfg, multi, single, atol):
    """Both workers hold identical weights, BN statistics and optimizer (EMA) state, equal to the single process's."""
    (w0, i0, _), (w1, i1, _) = multi
    (ws, is_, _) = single[0]
    assert i0["replicas"] == i1["replicas"] == 2 and is_["replicas"] == 1
    assert i0["bn"] > 0 and i0["bn_synced"] == i0["bn"]  # every BatchNorm uses global-batch statistics
    assert w0.keys() == w1.keys() and any(k.startswith("o") for k in w0)  # optimizer state (EMA) included
    for k in w0:  # identical on both workers: weights, BN moving statistics, optimizer and EMA variables
        np.testing.assert_array_equal(w0[k], w1[k], err_msg=k)
    # equal to one process on the global batch: Adam moves a weight by at most learning_rate a step, and a
    # weight whose gradient is ~0 can take a +-learning_rate step either way on float round-off; all others agree
    keys = [k for k in ws if k.startswith("w")]
    multi_w, single_w = (np.concatenate([w[k].ravel() for k in keys]) for w in (w0, ws))
    diff = np.abs(multi_w - single_w)
    assert diff.max() <= 2 * cfg.learning_rate * cfg.steps
    assert np.mean(diff <= atol + 1e-3 * np.abs(single_w)) >= 0.99, np.mean(diff <= atol + 1e-3 * np.abs(single_w))


def _check(cfg, tmp_path, atol, id_steps=3):
    """Train ``cfg`` on 2 workers and in one process; compare them, and what each worker fed."""
    # the 2 workers and the single-process reference run side by side (one thread each)
    multi, single = _finish([_start(cfg, tmp_path / "multi", 2, id_steps), _start(cfg, tmp_path / "single", 1, id_steps)])
    _compare(cfg, multi, single, atol)
    (_, i0, _), (_, i1, _) = multi
    is_ = single[0][1]
    # the single-process global batch is exactly the union of the workers' slices, and they are disjoint
    for step, whole in enumerate(is_["fed"]):
        a, b = i0["fed"][step], i1["fed"][step]
        assert len(a) == len(b) == len(whole) // 2
        assert sorted(map(tuple, a + b)) == sorted(map(tuple, whole))
        assert not ({tuple(x) for x in a} & {tuple(x) for x in b}) or len(set(map(tuple, whole))) < len(whole)
    segs = lambda fed: sorted(s for batch in fed for _, s in batch)  # noqa: E731
    assert segs(i0["fed"] + i1["fed"]) == segs(is_["fed"])  # the periodic proportions over the global batch
    assert json.loads((tmp_path / "multi" / "run" / "state.json").read_text())["done"]  # the chief wrote the run


def test_two_workers_train_the_classifier_like_one_process(vgg_records, tmp_path):
    cfg = TrainConfig(stage="classifier", data_dir=str(vgg_records), batch_size=4,
                      steps=4, val_every=2, learning_rate=1e-3, val_max_batches=1, export=False,
                      vgg=VGGConfig(width=0.0625))
    cfg.classifier.init_from = ""
    _check(cfg, tmp_path, atol=1e-5)
    # resumed to step 6: every worker reads the chief's last.keras and state.json, and still matches one process
    longer = dataclasses.replace(cfg, steps=6)
    multi, single = _finish([_start(longer, tmp_path / "multi", 2, 0, "-resumed"),
                             _start(longer, tmp_path / "single", 1, 0, "-resumed")])
    assert all("from step 4" in log for _, _, log in multi + single)
    _compare(longer, multi, single, atol=1e-5)
    history = json.loads((tmp_path / "multi" / "run" / "history.json").read_text())
    assert [h["step"] for h in history] == [2, 4, 6]


def test_two_workers_train_the_contrastive_stage_like_one_process(tiny_records, tmp_path):
    from mammodg.records.pairs import build_pairs

    build_pairs(tiny_records, tmp_path / "pairs", progress=False)
    cfg = TrainConfig(stage="contrastive", data_dir=str(tiny_records), batch_size=4, steps=2, val_every=2,
                      learning_rate=0.3, val_max_batches=1, export=False)
    c = cfg.contrastive
    c.method, c.pairs_dir, c.input_size, c.hidden_dim, c.projection_dim = "simclr", str(tmp_path / "pairs"), [32, 32], 16, 8
    c.backbone, c.width = "resnet18", 0.25  # few weights to all-reduce: ResNet-50's 24M take minutes on a loaded machine
    c.crop_scale = [0.5, 1.0]
    _check(cfg, tmp_path, atol=1e-5, id_steps=0)


def test_cluster_reads_tf_config(monkeypatch):
    from mammodg.config import ConfigError
    from mammodg.distributed import cluster

    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert cluster() == (1, 0, True)
    two = {"worker": ["a:1", "b:2"]}
    for task, expected in (({"type": "worker", "index": 0}, (2, 0, True)), ({"type": "worker", "index": 1}, (2, 1, False)),
                           ({"type": "chief", "index": 0}, (3, 0, True)), ({"type": "worker", "index": 0}, (3, 1, False))):
        spec = {**two, "chief": ["c:3"]} if expected[0] == 3 else two
        monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": spec, "task": task}))
        assert cluster() == expected
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 0}}))
    assert cluster() == (1, 0, True)  # a one-worker cluster trains like one machine
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": two, "task": {"type": "worker", "index": 5}}))
    with pytest.raises(ConfigError, match="TF_CONFIG: task"):
        cluster()
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ConfigError, match="TF_CONFIG: not a JSON"):
        cluster()
