"""Multi-worker training of the other stages (patch, cyclegan, detection, birads, density, matching): 2 CPU worker
processes on localhost (TF_CONFIG, free ports, killed on a timeout) each train a few steps of every stage in turn
under one MultiWorkerMirroredStrategy; both end every stage with identical weights, optimizer (EMA) state, BatchNorm
statistics and image pools, and only the chief writes (the other worker's run folder stays empty, and its private
copies are removed)."""
import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
from test_distributed import _launch, _wait

from mammodg.config import TrainConfig, VGGConfig, to_dict

TIMEOUT_S = 300  # both workers are killed after this
A, B = "PHANTOM|VendorA", "PHANTOM|VendorB"

WORKER = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import keras
    from mammodg import stages
    from mammodg.config import TrainConfig, from_dict
    from mammodg.distributed import distribution_strategy
    from mammodg.train import Trainer

    args = json.loads(sys.argv[1])
    strategy = distribution_strategy()  # one strategy for every stage of the process
    trained, run = [], Trainer.run

    def keep(self):  # every model a stage trains (CycleGAN: one per style pair), as the trainer returns it
        model = run(self)
        trained.append(model)
        return model

    Trainer.run = keep
    info = {"replicas": strategy.num_replicas_in_sync, "stages": {}}
    for d in args["cfgs"]:
        cfg = from_dict(TrainConfig, d)
        first = len(trained)
        stages.run(cfg.stage, cfg)
        info["stages"][cfg.stage] = len(trained) - first
        for j, model in enumerate(trained[first:]):
            optimizers = [o for o in (model.optimizer, getattr(model, "d_optimizer", None)) if o is not None]
            arrays = {f"{i}:{v.path}": keras.ops.convert_to_numpy(v) for i, v in enumerate(model.variables)}
            arrays |= {f"opt{k}:{i}:{v.path}": keras.ops.convert_to_numpy(v)
                       for k, o in enumerate(optimizers) for i, v in enumerate(o.variables)}
            np.savez(f"{args['out']}-{cfg.stage}{j}.npz", **arrays)
    json.dump(info, open(args["out"] + ".json", "w"))
""")


def _configs(tiny_records, vgg_records, pairs) -> list[TrainConfig]:
    """A few steps of each stage, tiny: 2 steps, one validation, no export."""
    common = dict(data_dir=str(tiny_records), batch_size=4, steps=2, val_every=2, val_max_batches=1, export=False)
    patch = TrainConfig(stage="patch", **{**common, "data_dir": str(vgg_records)}, learning_rate=1e-3,
                        vgg=VGGConfig(width=0.0625))
    patch.patch.patch_size = 192
    gan = TrainConfig(stage="cyclegan", **{**common, "batch_size": 2}, learning_rate=2e-4)
    g = gan.cyclegan
    g.styles, g.crop_size, g.generator_filters, g.generator_blocks = [A, B], 32, 4, 1
    g.discriminator_filters, g.pool_size, g.identity_weight = 4, 3, 0.5
    det = TrainConfig(stage="detection", **common, learning_rate=1e-3)
    d = det.detection
    d.backbone, d.input_size, d.width, d.tower_convs, d.groups = "tiny", [64, 48], 16, 1, 4
    birads = TrainConfig(stage="birads", **{**common, "batch_size": 8}, learning_rate=1e-2, strategy="natural")
    birads.birads.backbone, birads.birads.crop_size = "tiny", 32
    density = TrainConfig(stage="density", **common, learning_rate=1e-2, strategy="natural")
    density.density.backbone, density.density.input_size, density.density.pairs_dir = "tiny", [64, 48], str(pairs)
    match = TrainConfig(stage="matching", **common, learning_rate=1e-2)
    m = match.matching
    m.backbone, m.roi_size, m.backbone_width, m.hidden_dim, m.embedding_dim = "tiny", 32, 4, 16, 8
    return [patch, gan, det, birads, density, match]


def test_two_workers_train_every_other_stage_to_identical_weights(tiny_records, vgg_records, tmp_path):
    from mammodg.records.pairs import build_pairs

    pairs = tmp_path / "pairs"
    build_pairs(tiny_records, pairs, progress=False)
    cfgs = _configs(tiny_records, vgg_records, pairs)
    out = tmp_path / "multi"

    def args_of(k):  # each worker its own run folders (on a cluster: one shared folder), to see who writes
        return {"cfgs": [to_dict(c) | {"run_dir": str(out / f"run{k}" / c.stage)} for c in cfgs],
                "out": str(out / f"worker{k}")}

    for k in range(2):
        (tmp_path / f"tmp{k}").mkdir()
    runs = [_launch(WORKER, args_of, out, 2, env_of=lambda k: {"TMPDIR": str(tmp_path / f"tmp{k}")})]
    _wait(runs, TIMEOUT_S)
    infos = [json.loads((out / f"worker{k}.json").read_text()) for k in range(2)]
    assert infos[0] == infos[1] and infos[0]["replicas"] == 2
    assert infos[0]["stages"] == {c.stage: 1 for c in cfgs}  # one model per stage (one style pair)
    for c in cfgs:
        w0, w1 = (dict(np.load(out / f"worker{k}-{c.stage}0.npz")) for k in range(2))
        assert w0.keys() == w1.keys() and any(k.startswith("opt") for k in w0), c.stage
        for key in w0:  # weights, BN moving statistics, image pools, optimizer and EMA variables
            np.testing.assert_array_equal(w0[key], w1[key], err_msg=f"{c.stage} {key}")
        trained = [key for key in w0 if key.startswith("opt0:") and "iteration" in key]
        assert trained and all(int(w0[key]) == c.steps for key in trained), c.stage  # both trained every step
        state = json.loads((out / "run0" / c.stage / ("pair_PHANTOM_VendorA__PHANTOM_VendorB" if c.stage == "cyclegan"
                                                      else "") / "state.json").read_text())
        assert state["done"] and [h["step"] for h in state["history"]] == [2], c.stage
    gan = dict(np.load(out / "worker0-cyclegan0.npz"))
    assert int(next(v for k, v in gan.items() if k.endswith("pool_a/count"))) == 3  # the pool took the global fakes
    assert (out / "run0" / "cyclegan" / "styles.json").is_file()  # the chief's stage outputs
    assert not (out / "run1").exists() or not any((out / "run1").rglob("*")), sorted((out / "run1").rglob("*"))
    for k in range(2):  # the non-chief's private copies of the run folders are gone
        assert not list((tmp_path / f"tmp{k}").glob("mammodg-worker*"))
