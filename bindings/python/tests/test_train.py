"""phenocore.Trainer: one SGD step against torch (tests/fixtures/train_step, made by
tests/fixtures/make_train_step_fixture.py), checkpoint resumption, bad input, a tiny fit and cancel."""

import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest

import phenocore
from phenocore import PhenoError, Status, Trainer
from safetensors_np import read as read_safetensors

FIXTURES = Path(__file__).resolve().parents[3] / "tests" / "fixtures"
WEIGHTS = FIXTURES / "effnet" / "weights_f16.safetensors"
STEP = FIXTURES / "train_step" / "expected.safetensors"

_DTYPES = {"F16": "<f2", "F32": "<f4", "F64": "<f8", "I64": "<i8"}


def read_all(path):
    """name -> array in its stored dtype, and the metadata."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        out[key] = np.frombuffer(data[begin:end], dtype=_DTYPES[info["dtype"]]).reshape(info["shape"])
    return out, header.get("__metadata__", {})


def rel(ours, ref):
    """max |ours - ref| / max |ref| (the fixture's per-tensor measure)."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    scale = np.abs(ref).max()
    d = np.abs(ours - ref).max()
    return d / scale if scale > 0 else d


def test_one_step_matches_torch(tmp_path):
    fx, meta = read_all(STEP)
    assert float(meta["lr"]) == 0.05 and meta["nesterov"] == "true"
    trainer = Trainer(
        weights=WEIGHTS,
        in_channels=5,
        num_classes=10,
        lr=0.05,
        momentum=0.9,
        nesterov=True,
        weight_decay=1e-5,
        label_smoothing=0.1,
        dropout=0.0,
        drop_connect_rate=0.0,
        bn_momentum=0.1,
    )
    labels = fx["labels"].astype(np.int64)
    loss = trainer.step(fx["input"], labels)
    loss_ref = float(fx["loss_f64"][0])
    assert abs(loss - loss_ref) / loss_ref <= 1e-5, (loss, loss_ref)
    assert trainer.steps == 1

    out = tmp_path / "after.safetensors"
    trainer.save(out)
    after = read_safetensors(out)
    w0 = read_safetensors(WEIGHTS)
    worst, checked = 0.0, 0
    for key in fx:
        if key.startswith("delta/"):
            name = key[len("delta/") :]
            updated_ref = (w0[name].astype(np.float64) + fx[key].astype(np.float64)).astype(np.float32)
            r = rel(after[name], updated_ref)
            assert r <= 1e-4, (name, r)
            worst, checked = max(worst, r), checked + 1
        elif key.startswith("running/"):
            name = key[len("running/") :]
            r = rel(after[name], fx[key])
            assert r <= 1e-4, (name, r)
    assert checked == 213
    print(f"loss {loss} vs torch f64 {loss_ref}; updated weights max relative difference {worst:.2e}")


def _crops(rng, n, c=3, hw=32):
    return rng.random((n, c, hw, hw), dtype=np.float32)


def test_checkpoint_resume_gives_identical_next_step(tmp_path):
    rng = np.random.default_rng(3)
    x1, x2 = _crops(rng, 4), _crops(rng, 4)
    y1, y2 = np.array([0, 1, 2, 1]), np.array([2, 2, 0, 1])
    kw = dict(in_channels=3, num_classes=3, seed=5, lr=0.01, dropout=0.3, drop_connect_rate=0.2, augment=True,
              clip_grad_norm=1.0)
    a = Trainer(**kw)
    a.step(x1, y1)
    ck = tmp_path / "ck.safetensors"
    a.save_checkpoint(ck)
    loss_a = a.step(x2, y2)
    a.save(tmp_path / "a.safetensors")

    b = Trainer(**dict(kw, seed=9))  # other initial weights: all state must come from the checkpoint
    b.load_checkpoint(ck)
    assert b.steps == 1
    loss_b = b.step(x2, y2)
    b.save(tmp_path / "b.safetensors")
    assert loss_a == loss_b
    wa, wb = read_safetensors(tmp_path / "a.safetensors"), read_safetensors(tmp_path / "b.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k], err_msg=k)
    # without the checkpoint the step differs (the test can fail)
    c = Trainer(**dict(kw, seed=9))
    c.step(x1, y1)
    assert c.step(x2, y2) != loss_a


def test_bad_input_names_the_culprit():
    rng = np.random.default_rng(0)
    t = Trainer(in_channels=3, num_classes=2, seed=0)
    x = _crops(rng, 3)
    with pytest.raises(PhenoError) as e:
        t.step(x, [0, 1, 2])
    assert e.value.status == Status.INVALID_ARGUMENT and "crop 2" in e.value.message, e.value
    with pytest.raises(PhenoError) as e:
        t.step(x, [0, -1, 1])
    assert e.value.status == Status.INVALID_ARGUMENT and "crop 1" in e.value.message, e.value
    bad = x.copy()
    bad[1, 2, 5, 7] = np.nan
    with pytest.raises(PhenoError) as e:
        t.step(bad, [0, 1, 1])
    assert e.value.status == Status.NON_FINITE and "crop 1" in e.value.message, e.value
    with pytest.raises(PhenoError) as e:
        t.step(_crops(rng, 2, c=4), [0, 1])
    assert e.value.status == Status.SHAPE and "channels" in e.value.message
    with pytest.raises(PhenoError) as e:
        t.step(x, [0, 1])
    assert e.value.status == Status.SHAPE
    with pytest.raises(PhenoError) as e:
        Trainer(in_channels=3, num_classes=2, label_smoothing=1.5)
    assert e.value.status == Status.INVALID_ARGUMENT and "label_smoothing" in e.value.message
    assert t.steps == 0  # nothing was applied



def test_device_training_is_refused_with_a_reason_or_runs():
    """device="cuda": a library without the `cuda` feature says UNSUPPORTED, one without a GPU
    NO_DEVICE (with a message); on a GPU a step runs. compute needs a device and a known name."""
    try:
        t = Trainer(in_channels=3, num_classes=2, seed=0, device="cuda", compute="bf16")
    except PhenoError as e:
        assert e.status in (Status.UNSUPPORTED, Status.NO_DEVICE), e
        assert "cuda" in e.message.lower() or "driver" in e.message.lower() or "gpu" in e.message.lower(), e
    else:
        loss = t.step(_crops(np.random.default_rng(0), 2), [0, 1])
        assert math.isfinite(loss) and t.steps == 1
    with pytest.raises(PhenoError) as e:
        Trainer(in_channels=3, num_classes=2, compute="bf16")
    assert e.value.status == Status.INVALID_ARGUMENT and "device" in e.value.message, e.value
    with pytest.raises(PhenoError) as e:
        Trainer(in_channels=3, num_classes=2, compute="fp8")
    assert e.value.status == Status.INVALID_ARGUMENT and "fp8" in e.value.message, e.value
    with pytest.raises(PhenoError) as e:
        Trainer(in_channels=3, num_classes=2, device="tpu")
    assert e.value.status == Status.INVALID_ARGUMENT and "tpu" in e.value.message, e.value

def _toy(rng, n_per=8):
    """2 classes on 2 plates × 2 wells: class 1 crops are brighter."""
    xs, ys, gs, ps = [], [], [], []
    for plate in range(2):
        for well, label in ((0, 0), (1, 1)):
            x = _crops(rng, n_per, c=5) * 0.5 + 0.5 * label
            xs.append(x)
            ys += [label] * n_per
            gs += [well] * n_per
            ps += [plate] * n_per
    return np.concatenate(xs), np.array(ys), np.array(gs), np.array(ps)


def test_tiny_fit_reports_epochs_and_cancels(tmp_path):
    rng = np.random.default_rng(1)
    x, y, g, p = _toy(rng)
    # 32 x 32 crops end in 1 x 1 maps whose BN statistics over a few crops make unclipped steps explode
    # in eval mode (as in torch): start from the fixture weights (activations of order 1) and clip.
    kw = dict(weights=WEIGHTS, in_channels=5, num_classes=2, seed=2, batch_size=8, epochs=2, lr=0.01, clip_grad_norm=1.0)
    t = Trainer(**kw)
    events = []
    reports = t.fit(x, y, g, p, split="cells", train_fraction=0.5, checkpoint=tmp_path / "ck", best=tmp_path / "best",
                    progress=events.append)
    assert [r["epoch"] for r in reports] == [0, 1]
    for r in reports:
        assert r["steps"] == 2  # 2 classes × median 8 training crops per class / batch 8
        assert math.isfinite(r["train_loss"]) and r["train_loss"] > 0
        assert 0 <= r["train_accuracy"] <= 1 and 0 <= r["val_accuracy"] <= 1
        assert r["val_top5"] is None  # fewer than 5 classes
        assert r["lr"] == pytest.approx(0.01)
    assert t.steps == 4 and t.epochs_done == 2
    assert sum(1 for e in events if not e["epoch_end"]) == 4
    assert [e["epoch"] for e in events if e["epoch_end"]] == [0, 1]
    assert (tmp_path / "ck").is_file() and (tmp_path / "best").is_file()

    # deterministic given the seed
    again = Trainer(**kw).fit(x, y, g, p, split="cells", train_fraction=0.5)
    assert [r["train_loss"] for r in again] == [r["train_loss"] for r in reports]

    # the inference model has the trainer's weights
    m = t.model()
    assert isinstance(m, phenocore.EfficientNet)
    ours, ref = m.logits(x[:4]), t.predict(x[:4])
    scale = np.abs(ref).max()
    assert np.isfinite(ref).all() and 1e-2 < scale < 1e3, ref
    assert rel(ours, ref) <= 1e-4, rel(ours, ref)

    # cancel in the second epoch: CANCELLED, the epoch-1 checkpoint stays valid
    u = Trainer(**kw)
    with pytest.raises(PhenoError) as e:
        u.fit(x, y, g, p, split="plates", val_plates=[1], checkpoint=tmp_path / "ck2",
              progress=lambda ev: not (ev["epoch"] == 1 and not ev["epoch_end"]))
    assert e.value.status == Status.CANCELLED
    assert len(e.value.reports) == 1 and e.value.reports[0]["val_accuracy"] is not None
    assert u.steps == 3  # 2 of epoch 0, the cancelling step of epoch 1
    v = Trainer(**kw)
    v.load_checkpoint(tmp_path / "ck2")
    assert (v.steps, v.epochs_done) == (2, 1)
    # resuming runs the remaining epoch only
    rest = v.fit(x, y, g, p, split="plates", val_plates=[1])
    assert [r["epoch"] for r in rest] == [1]
    # an exception in the callback cancels and propagates
    with pytest.raises(ZeroDivisionError):
        Trainer(**kw).fit(x, y, split="none", progress=lambda ev: 1 / 0)


def test_domain_adversarial_branch(tmp_path):
    rng = np.random.default_rng(4)
    x, y, d = _crops(rng, 4), np.array([0, 1, 2, 1]), np.array([0, 1, 1, 0])
    kw = dict(in_channels=3, num_classes=3, seed=5, lr=0.01, clip_grad_norm=1.0,
              domain_adversarial={"domains": 2, "lambda": 0.5, "hidden": (32, 16)})
    t = Trainer(**kw)
    with pytest.raises(PhenoError) as e:
        t.step(x, y)  # the branch needs each crop's domain
    assert e.value.status == Status.INVALID_ARGUMENT and "step_with_domains" in e.value.message, e.value
    with pytest.raises(PhenoError) as e:
        t.step(x, y, domains=[0, 1, 2, 0])
    assert e.value.status == Status.INVALID_ARGUMENT and "crop 2" in e.value.message, e.value
    assert t.steps == 0
    assert math.isfinite(t.step(x, y, domains=d))
    ck = tmp_path / "ck.safetensors"
    t.save_checkpoint(ck)
    loss = t.step(x, y, domains=d)
    u = Trainer(**dict(kw, seed=9))
    u.load_checkpoint(ck)
    assert u.step(x, y, domains=d) == loss
    # the checkpoint holds the head, the exported weights do not
    ckt, _ = read_all(ck)
    assert ckt["domain_head.0.weight"].shape == (32, 1280) and ckt["domain_head.2.weight"].shape == (2, 16)
    t.save(tmp_path / "w.safetensors")
    assert not any(k.startswith("domain_head") for k in read_safetensors(tmp_path / "w.safetensors"))
    with pytest.raises(PhenoError) as e:
        Trainer(in_channels=3, num_classes=3, domain_adversarial={"domains": 2, "lamda": 1.0})
    assert "lamda" in e.value.message
    with pytest.raises(PhenoError) as e:
        Trainer(in_channels=3, num_classes=3, domain_adversarial={"domains": 1})
    assert e.value.status == Status.INVALID_ARGUMENT


def test_attention_mil_bags(tmp_path):
    rng = np.random.default_rng(5)
    mil = {"bag_size": 4, "min_treated": 1, "max_treated": 3, "control_classes": [0], "attention_dim": 8}
    t = Trainer(in_channels=3, num_classes=3, seed=1, lr=0.01, clip_grad_norm=1.0, mil=mil)
    x = _crops(rng, 8)
    assert math.isfinite(t.step_bags(x, [1, 2]))
    with pytest.raises(PhenoError) as e:
        t.step(x, [0] * 8)
    assert "step_bags" in e.value.message
    with pytest.raises(PhenoError) as e:
        t.step_bags(x[:7], [1, 2])
    assert e.value.status == Status.SHAPE
    with pytest.raises(PhenoError) as e:
        Trainer(in_channels=3, num_classes=3, mil={})
    assert "control_classes" in e.value.message
    # fit on bags: class 0 is the control
    xs, ys, g, p = _toy(rng)
    f = Trainer(weights=WEIGHTS, in_channels=5, num_classes=2, seed=2, batch_size=2, epochs=1, lr=0.01,
                clip_grad_norm=1.0, mil=dict(mil, control_classes=[0]))
    reports = f.fit(xs, ys, g, p, split="none")
    assert len(reports) == 1 and math.isfinite(reports[0]["train_loss"]) and reports[0]["steps"] >= 1
    # without control crops: an error naming the problem
    h = Trainer(weights=WEIGHTS, in_channels=5, num_classes=2, seed=2, batch_size=2, epochs=1, mil=mil)
    with pytest.raises(PhenoError) as e:
        h.fit(xs[ys == 1], ys[ys == 1], split="none")
    assert "control crops" in e.value.message, e.value
