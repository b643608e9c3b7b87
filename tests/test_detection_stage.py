"""``mammodg train/evaluate/export --stage detection`` (issue 18) on tiny phantom records: the CLI trains a
few steps, the evaluation report counts the split's images and mass boxes read directly from the records,
the SavedModel matches the Keras detector + decoder in a fresh process, augmentation keeps boxes on their
lesions (eagerly and in Dataset.map), and a batch without lesions gives a finite loss."""
import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from mammodg.cli import main
from mammodg.config import DetectionConfig, TrainConfig, load
from mammodg.records.schema import encode_example, encode_png16, parse

TINY = ["detection.backbone=tiny", "detection.input_size=[64,48]", "detection.width=16", "detection.tower_convs=1",
        "detection.groups=4", "batch_size=4", "steps=4", "val_every=2", "learning_rate=0.001", "val_max_batches=0"]


@pytest.fixture(scope="module")
def run(tiny_records, tmp_path_factory):
    out = tmp_path_factory.mktemp("det") / "run"
    rc = main(["train", "--stage", "detection", "--set", f"data_dir={tiny_records}", "--set", f"run_dir={out}",
               *[a for s in TINY for a in ("--set", s)]])
    assert rc == 0
    return out


def split_truth(data_dir, split):
    """(images, mass boxes) of a split, straight from the records."""
    from mammodg.records.reader import all_shards, load_index

    n = boxes = 0
    for raw in tf.data.TFRecordDataset(sorted(all_shards(load_index(data_dir), data_dir, split))):
        r = parse(raw, decode_image=False)
        n += 1
        boxes += sum(c.decode().endswith("_mass") for c in r["lesion_class"].numpy())
    return n, boxes


def test_train_writes_history_checkpoint_and_saved_model(run):
    history = json.loads((run / "history.json").read_text())
    assert [h["step"] for h in history] == [2, 4]
    for h in history:
        assert np.isfinite(h["train_loss"]) and np.isfinite(h["monitor"])
        ap = h["global"]["ap50"]
        assert ap is None or h["monitor"] == pytest.approx(1 - ap)
    assert (run / "best.weights.h5").is_file() and (run / "saved_model" / "saved_model.pb").is_file()


def test_evaluate_writes_the_report(run, tiny_records, capsys):
    assert main(["evaluate", "--stage", "detection", "--run", str(run)]) == 0
    report = json.loads((run / "detection_val" / "detection_report.json").read_text())
    n, boxes = split_truth(tiny_records, "val")
    assert boxes > 0, "the tiny phantoms' val split should hold masses"
    assert (report["global"]["n_images"], report["global"]["n_lesions"]) == (n, boxes)
    assert report["froc"]["all"]["fps_per_image"] == [0.5, 1.0, 2.0, 4.0]
    segments = set(json.loads((tiny_records / "dataset.json").read_text())["splits"]["train"])
    row = report["table_ap50"][0]
    assert set(row["seen"]) <= segments and not row.get("unseen")
    assert (run / "detection_val" / "overlays.png").stat().st_size > 0
    assert "ap50" in capsys.readouterr().out


def test_evaluate_on_other_data_puts_its_domains_in_unseen(run, phantoms, tmp_path):
    """--data: segments absent from the run's train split are the unseen domains of the Table II rows."""
    from mammodg.config import BuildConfig, PreprocessConfig
    from mammodg.records.writer import build

    other = tmp_path / "by_view"
    build(phantoms, other, BuildConfig(preprocess=PreprocessConfig(height=64, width=48), segment_keys=["source", "view"],
                                       pseudonym_salt="test-salt-16chars", workers=2, shard_size=64), progress=False)
    assert main(["evaluate", "--stage", "detection", "--run", str(run), "--data", str(other)]) == 0
    report = json.loads((run / "detection_by_view_val" / "detection_report.json").read_text())
    row = report["table_ap50"][0]
    assert not row.get("seen") and set(row["unseen"]) == set(json.loads((other / "dataset.json").read_text())["splits"]["val"])
    assert (report["global"]["n_images"], report["global"]["n_lesions"]) == split_truth(other, "val")


def test_saved_model_matches_keras_detector_in_a_fresh_process(run, tiny_records, tmp_path):
    from test_export import serve

    from mammodg.augment.detection import detect, load_detector
    from mammodg.records.reader import all_shards, load_index

    cfg = load(TrainConfig, run / "config.yaml")
    files = sorted(all_shards(load_index(tiny_records), tiny_records, "val"))
    images = np.stack([parse(r)["image"].numpy() for r in tf.data.TFRecordDataset(files).take(3)])
    got = serve(tmp_path, {run / "saved_model": images})[run / "saved_model"]
    ref = detect(load_detector(run / "best.weights.h5", cfg.detection), tf.constant(images), cfg.detection,
                 stored_shape=images.shape[1:3], target_mean=cfg.target_mean)
    assert int(ref["num_detections"].numpy().sum()) > 0
    for sig in ("images", "examples"):
        np.testing.assert_array_equal(got[f"{sig}/num_detections"], ref["num_detections"].numpy())
        np.testing.assert_array_equal(got[f"{sig}/classes"], ref["classes"].numpy())
        for k in ("boxes", "scores"):
            np.testing.assert_allclose(got[f"{sig}/{k}"], ref[k].numpy(), rtol=0, atol=1e-5)


def _lesion_record(h=64, w=48, box=(10, 20, 26, 36)):
    """A stored image (breast everywhere, dim) with one bright square mass and one calcification box."""
    img = np.full((h, w), 1000, np.uint16)
    x0, y0, x1, y1 = box
    img[y0:y1, x0:x1] = 60000
    return encode_example({"image": encode_png16(img), "height": h, "width": w, "boxes/x_min": [x0, 30.0],
                           "boxes/y_min": [y0, 2.0], "boxes/x_max": [x1, 34.0], "boxes/y_max": [y1, 6.0],
                           "boxes/lesion_class": [b"malignant_mass", b"benign_calc"]})


def test_augmentation_keeps_boxes_on_the_lesion_eager_and_in_dataset_map():
    from mammodg.augment.detection import detection_decoder

    d = DetectionConfig(input_size=[64, 48], flip=0.5, scale=[0.7, 1.4])
    decode = detection_decoder(d, stored_shape=(64, 48), target_mean=0.25, seed=3, training=True)
    raw = _lesion_record()
    eager = [decode(tf.constant(i, tf.int64), tf.constant(raw)) for i in range(12)]
    mapped = list(tf.data.Dataset.range(12).map(lambda i: decode(i, tf.constant(raw))))
    lefts = set()
    for (x, t), (xm, tm) in zip(eager, mapped):
        np.testing.assert_allclose(x.numpy(), xm.numpy(), atol=1e-6)
        np.testing.assert_array_equal(t.numpy(), tm.numpy())
        rows = t.numpy()[t.numpy()[:, 4] >= 0]
        assert len(rows) == 1 and rows[0, 4] == 0  # the mass only, class 0 "mass"; the calcification dropped
        x0, y0, x1, y1 = np.round(rows[0, :4]).astype(int)
        inside = x.numpy()[y0 + 1:y1 - 1, x0 + 1:x1 - 1, 0]
        assert inside.mean() > 0.8 and x.numpy()[..., 0].mean() < 0.5  # the box sits on the bright lesion
        lefts.add(int(x0))
    assert len(lefts) > 3  # flips and scales moved it


def test_no_lesion_batch_gives_the_focal_loss_of_all_negatives():
    from mammodg.augment.detection import PackedFCOSLoss, pack_targets

    rng = np.random.default_rng(0)
    n = 8 * 6 + 4 * 3 + 2 * 2 + 1 + 1  # locations of a 64x48 input at P3-P7
    y_pred = rng.normal(size=(2, n, 6)).astype(np.float32)
    y_pred[..., 1:5] = np.abs(y_pred[..., 1:5]) + 1
    empty = tf.stack([pack_targets(tf.zeros((0, 4)), tf.zeros((0,), tf.int32), 4)] * 2)
    loss = keras.ops.convert_to_numpy(PackedFCOSLoss((64, 48))(empty, y_pred))
    p = 1 / (1 + np.exp(-y_pred[..., 0]))
    focal = 0.75 * p ** 2 * -np.log(1 - p)  # label 0: (1 - alpha) p^gamma BCE
    np.testing.assert_allclose(loss, focal.sum(), rtol=1e-4)


def test_missing_contrastive_backbone_is_a_one_line_error(tiny_records, tmp_path, capsys):
    rc = main(["train", "--stage", "detection", "--set", f"data_dir={tiny_records}", "--set", f"run_dir={tmp_path / 'r'}",
               "--set", f"detection.backbone_from={tmp_path / 'nope'}"])
    assert rc == 2 and "backbone.weights.h5 not found" in capsys.readouterr().err


def test_nan_loss_stops_naming_the_step(tiny_records, tmp_path, capsys):
    """The trainer's NaN guard applies to the detection loss: an exploding learning rate stops the run."""
    args = [a for s in TINY + ["learning_rate=1e30", "steps=4", "val_every=4"] for a in ("--set", s)]
    rc = main(["train", "--stage", "detection", "--set", f"data_dir={tiny_records}", "--set",
               f"run_dir={tmp_path / 'r'}", *args])
    err = capsys.readouterr().err
    assert rc == 1 and "NaN/inf at step" in err and "none (no period finished yet)" in err, err


def test_two_replica_fit_step_equals_one_device_step():
    """One SGD step of model.fit with the packed loss under a 2-replica MirroredStrategy moves the weights
    as one device on the same global batch (positives all-reduced; the scalar loss is not divided by 2)."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import numpy as np, tensorflow as tf, keras
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from mammodg.augment.detection import PackedFCOSLoss, packed_model
        from mammodg.models.fcos import fcos_model
        rng = np.random.default_rng(0)
        x = rng.uniform(0, 1, size=(4, 64, 48, 1)).astype(np.float32)
        y = np.tile(np.array([[0, 0, 0, 0, -1]], np.float32), (4, 3, 1))
        y[0, 0] = [4, 6, 40, 30, 0]; y[2, :2] = [[20, 20, 44, 62, 0], [2, 40, 20, 60, 0]]  # one image per replica empty
        def step(strategy):
            with strategy.scope():
                keras.utils.set_random_seed(1)
                model = packed_model(fcos_model((64, 48, 1), backbone="tiny", width=16, tower_convs=1, groups=4))
                model.compile(optimizer=keras.optimizers.SGD(0.1), loss=PackedFCOSLoss((64, 48)))
            before = [w.numpy() for w in model.trainable_weights]
            model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(4), epochs=1, verbose=0, shuffle=False)
            return [a - w.numpy() for a, w in zip(before, model.trainable_weights)]
        one = step(tf.distribute.get_strategy())
        two = step(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
        scale = max(float(np.abs(d).max()) for d in one)
        print("RESULT", scale, max(float(np.abs(a - b).max()) for a, b in zip(one, two)))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT")]
    assert line, out.stderr[-3000:]
    scale, diff = (float(v) for v in line[0].split()[1:])
    assert scale > 1e-4 and diff < 1e-3 * scale, (scale, diff)


def test_resume_extends_the_run(run, tiny_records, capsys):
    """Re-running with more steps resumes from last.keras (the packed model and its SGD + EMA state)."""
    args = [a for s in TINY + ["steps=6"] for a in ("--set", s)]
    assert main(["train", "--stage", "detection", "--set", f"data_dir={tiny_records}", "--set", f"run_dir={run}",
                 *args]) == 0
    assert "resuming" in capsys.readouterr().out
    assert [h["step"] for h in json.loads((run / "history.json").read_text())] == [2, 4, 6]



def test_optimizer_warms_up_linearly_then_holds_the_learning_rate():
    """Learning rate: 0.1 x lr at step 0, linear to lr at step min(300, steps // 3), then lr (by hand)."""
    from mammodg.stages.detection import learning_rate_schedule, optimizer

    def rates(steps, at):
        cfg = load(TrainConfig, "demo/detection.yaml", ["learning_rate=0.02", f"steps={steps}"])
        return [float(learning_rate_schedule(cfg)(k)) for k in at], cfg

    got, cfg = rates(1000, (0, 150, 300, 999))
    np.testing.assert_allclose(got, [0.002, 0.011, 0.02, 0.02], rtol=1e-5)
    np.testing.assert_allclose(rates(30, (0, 5, 10, 29))[0], [0.002, 0.011, 0.02, 0.02], rtol=1e-5)
    opt = optimizer(cfg)
    np.testing.assert_allclose(float(opt.learning_rate), 0.002, rtol=1e-5)  # the optimizer runs on it: step 0
    assert (opt.momentum, opt.weight_decay) == (cfg.detection.momentum, cfg.detection.weight_decay)
