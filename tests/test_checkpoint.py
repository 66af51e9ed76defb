"""Checkpoints and resume: exact continuation, crash safety with real SIGKILLs, checkpoint contents and refusals."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cellvae import CellvaeInputError, CountVAE
from cellvae.train import CHECKPOINT_NAME, load_checkpoint, save_checkpoint

HERE = Path(__file__).resolve().parent
SMALL = dict(n_hidden=32, n_latent=5)
TRAIN = dict(batch_size=64, n_epochs_kl_warmup=3, seed=3, progress_bar=False, n_threads=1)


def _state(m: CountVAE) -> dict:
    return {k: v.clone() for k, v in m.module.state_dict().items()}


def _assert_same_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=f"{k} differs")


@pytest.mark.parametrize("lr_schedule", ["cosine", "constant", "plateau"])
def test_resume_equals_uninterrupted(tmp_path, zeisel_small, monkeypatch, lr_schedule):
    """A 6-epoch run that fails after its epoch-3 checkpoint, resumed: the same weights (bit for bit on CPU),
    history and best epoch as 6 epochs straight; the cosine learning rate continues where it was, and the plateau
    schedule's cut after epoch 3 (decided by the validation ELBOs of epochs 1-3, before the crash) is kept."""
    import cellvae.train.checkpoint as train_mod

    kw = dict(TRAIN, lr_schedule=lr_schedule, checkpoint_every=3)
    if lr_schedule == "plateau":  # a high rate whose validation ELBO falls at epoch 3: a cut from epoch 4 on
        kw.update(lr=3e-2, lr_patience=0)
    straight = CountVAE(zeisel_small, **SMALL).train(max_epochs=6, **kw)
    calls = []

    def crash_at_second_checkpoint(path):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(train_mod, "_CHECKPOINT_HOOK", crash_at_second_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        CountVAE(zeisel_small, **SMALL).train(max_epochs=6, checkpoint_dir=tmp_path, **kw)
    monkeypatch.setattr(train_mod, "_CHECKPOINT_HOOK", None)
    assert load_checkpoint(tmp_path)["epoch"] == 3
    resumed = CountVAE(zeisel_small, **SMALL)  # a fresh object, as after a crash
    resumed.train(max_epochs=6, checkpoint_dir=tmp_path, resume=True, **kw)
    _assert_same_weights(_state(resumed), _state(straight))
    h, r = straight.history, resumed.history
    assert r["resumed_from_epoch"] == 3 and h["resumed_from_epoch"] == 0
    for key in ("epoch", "kl_weight", "lr", "train_loss", "train_elbo", "validation_elbo", "skipped_steps"):
        assert r[key] == h[key], key
    if lr_schedule == "cosine":
        assert h["lr"][0] < 1e-3 and 1e-5 < h["lr"][-1] < 1.5e-5 and np.all(np.diff(h["lr"]) < 0)
    elif lr_schedule == "plateau":
        assert h["lr"][:4] == pytest.approx([3e-2, 3e-2, 3e-2, 3e-2 * 0.6], rel=1e-12)
    else:
        assert h["lr"] == [1e-3] * 6
    assert r["best_epoch"] == h["best_epoch"] and r["n_skipped_steps"] == 0
    np.testing.assert_array_equal(resumed.validation_indices, straight.validation_indices)


def test_resume_restores_early_stopping_state(tmp_path, zeisel_small):
    """Best weights, best epoch and epochs-without-improvement survive a resume: early stopping fires at the same
    epoch and the same best weights are restored."""
    # constant lr: the interrupted run is simulated by a smaller max_epochs, which a cosine schedule depends on
    kw = dict(TRAIN, n_epochs_kl_warmup=1, lr=3e-2, lr_schedule="constant", early_stopping_patience=2)
    straight = CountVAE(zeisel_small, **SMALL).train(max_epochs=40, **kw)
    h = straight.history
    assert h["stopped_early"], "set-up: this run should stop early"
    n = len(h["epoch"])
    cut = n - 1  # interrupted one epoch before early stopping: bad_epochs > 0 in the checkpoint
    CountVAE(zeisel_small, **SMALL).train(max_epochs=cut, checkpoint_dir=tmp_path, **kw)
    ck = load_checkpoint(tmp_path)
    assert ck["best"]["bad_epochs"] >= 1 and ck["best"]["state"] is not None
    resumed = CountVAE(zeisel_small, **SMALL).train(max_epochs=40, checkpoint_dir=tmp_path, resume=True, **kw)
    assert resumed.history["stopped_early"] and resumed.history["epoch"] == h["epoch"]
    assert resumed.history["best_epoch"] == h["best_epoch"] < n
    _assert_same_weights(_state(resumed), _state(straight))
    # A finished run is not trained again: resuming it only restores the best weights.
    again = CountVAE(zeisel_small, **SMALL).train(max_epochs=40, checkpoint_dir=tmp_path, resume=True, **kw)
    assert again.history["epoch"] == h["epoch"] and again.history["resumed_from_epoch"] == n
    _assert_same_weights(_state(again), _state(straight))


def test_checkpoint_contents_are_plain_tensors(tmp_path, zeisel_small):
    m = CountVAE(zeisel_small, **SMALL).train(max_epochs=4, checkpoint_dir=tmp_path, checkpoint_every=2, **TRAIN)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [CHECKPOINT_NAME]  # no temporary files left behind
    ck = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)  # no pickled code needed
    assert ck["epoch"] == 4 and ck["finished"] and ck["step"] == 4 * 5  # 270 training cells / 64 -> 5 steps
    for key in ("module", "optimizer", "minibatch_rng", "torch_rng", "best", "history", "plan", "train_idx"):
        assert key in ck, key
    assert ck["optimizer"]["state"] and ck["minibatch_rng"].dtype == torch.uint8
    assert ck["history"]["epoch"] == [1, 2, 3, 4] and ck["best"]["epoch"] == m.history["best_epoch"]
    assert ck["meta"]["data_spec"]["gene_names"] == list(zeisel_small.var_names)


def test_checkpoint_refusals_and_damage(tmp_path, zeisel_small, kang_small):
    d = tmp_path / "ck"
    CountVAE(zeisel_small, **SMALL).train(max_epochs=2, checkpoint_dir=d, **TRAIN)
    with pytest.raises(CellvaeInputError, match="already holds a checkpoint.*resume=True"):
        CountVAE(zeisel_small, **SMALL).train(max_epochs=2, checkpoint_dir=d, **TRAIN)
    with pytest.raises(CellvaeInputError, match=r"another model or data \(data_spec differs\)"):
        CountVAE(zeisel_small[:, :150].copy(), **SMALL).train(max_epochs=2, checkpoint_dir=d, resume=True, **TRAIN)
    with pytest.raises(CellvaeInputError, match=r"module_kwargs differs"):
        CountVAE(zeisel_small, n_hidden=16).train(max_epochs=2, checkpoint_dir=d, resume=True, **TRAIN)
    with pytest.raises(CellvaeInputError, match=r"seed \(3 in the checkpoint, 4 now\)"):
        CountVAE(zeisel_small, **SMALL).train(max_epochs=2, checkpoint_dir=d, resume=True, **dict(TRAIN, seed=4))
    with pytest.warns(UserWarning, match=r"changed settings.*lr: 0.001 -> 0.0001"):
        CountVAE(zeisel_small, **SMALL).train(max_epochs=3, checkpoint_dir=d, resume=True, lr=1e-4, **TRAIN)
    with pytest.raises(CellvaeInputError, match="needs the checkpoint_dir"):
        CountVAE(zeisel_small, **SMALL).train(max_epochs=2, resume=True, **TRAIN)
    # A damaged checkpoint is reported, never half-read.
    raw = (d / CHECKPOINT_NAME).read_bytes()
    (d / CHECKPOINT_NAME).write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CellvaeInputError, match="is damaged: not a readable zip archive.*Delete it"):
        CountVAE(zeisel_small, **SMALL).train(max_epochs=2, checkpoint_dir=d, resume=True, **TRAIN)
    # A checkpoint holding pickled objects other than tensors is refused (weights_only), the code never runs.
    marker = tmp_path / "pwned"
    torch.save({"checkpoint_version": 1, "x": _Evil(str(marker))}, d / CHECKPOINT_NAME)
    with pytest.raises(CellvaeInputError, match="cannot be read"):
        load_checkpoint(d)
    assert not marker.exists()


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_save_checkpoint_is_atomic(tmp_path, monkeypatch):
    """A failure between writing the temporary file and renaming it leaves the old checkpoint intact and no
    temporary file; a leftover temporary file (a killed writer) is removed by the next load and never read."""
    import cellvae.train.checkpoint as train_mod

    save_checkpoint({"checkpoint_version": 1, "epoch": 1}, tmp_path)

    def boom(tmp):
        assert tmp.exists() and tmp.stat().st_size > 0
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "_CHECKPOINT_HOOK", boom)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"checkpoint_version": 1, "epoch": 2}, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_NAME]
    (tmp_path / f".{CHECKPOINT_NAME}.abc123.tmp").write_bytes(b"partial garbage")
    assert load_checkpoint(tmp_path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_NAME]


# ------------------------------------------------------------------------------------ real crashes (SIGKILL)


def _start_and_kill_when_paused(args: list[str], timeout: float = 240.0) -> tuple[str, float]:
    """Run tests/crash_train.py; when it prints PAUSED, SIGKILL it. Returns the PAUSED line and the seconds."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(HERE / "crash_train.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    out = []
    try:
        while True:
            line = lines.get(timeout=max(1.0, timeout - (time.perf_counter() - t0)))
            out.append(line)
            if line.startswith("PAUSED"):
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=60)
                assert proc.returncode == -signal.SIGKILL
                return line.strip(), time.perf_counter() - t0
            if line.startswith("DONE") or proc.poll() is not None and lines.empty():
                raise AssertionError("the training ended without pausing:\n" + "".join(out))
    except queue.Empty:
        raise AssertionError("no PAUSED line in time:\n" + "".join(out)) from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigkill_mid_epoch_and_mid_checkpoint_write_then_resume(tmp_path, data_dir, capsys):
    """Real crashes: SIGKILL in the middle of an epoch, then (after a resume) in the middle of a checkpoint write
    (temporary file written and fsynced, not yet renamed). The checkpoint that is read is always a complete one,
    the leftover temporary file is ignored and removed, at most one checkpoint interval of work is lost, and the
    final weights equal those of an uninterrupted run."""
    sys.path.insert(0, str(HERE))
    import crash_train as ct

    if not (data_dir / "zeisel2015_cortex_subset_1464cells.h5ad").exists():
        pytest.skip(f"dataset zeisel2015_cortex_subset_1464cells.h5ad not found in {data_dir}")
    adata = ct.crash_setup(data_dir)
    straight = CountVAE(adata, **ct.MODEL_KW).train(**ct.TRAIN_KW)
    steps_per_epoch = 5  # 270 training cells, batch size 64
    ck_dir = tmp_path / "ck"
    common = [str(ck_dir), "--data-dir", str(data_dir)]

    # 1. Killed in the middle of epoch 5 (after 2 of its 5 minibatches); checkpoints every 3 epochs.
    line, _ = _start_and_kill_when_paused([*common, "--pause", "epoch:5"])
    assert "in epoch 5" in line
    ck = load_checkpoint(ck_dir)
    assert ck["epoch"] == 3 and not ck["finished"]
    lost_1 = (4 + 2 / steps_per_epoch) - ck["epoch"]  # epoch 4 and 2/5 of epoch 5

    # 2. Resumed in a new process, killed while writing its first checkpoint (after epoch 6): the temporary file
    #    is complete but not renamed, so checkpoint.pt still holds epoch 3.
    line, _ = _start_and_kill_when_paused([*common, "--resume", "--pause", "checkpoint:1"])
    assert "temporary file" in line
    leftovers = [p for p in ck_dir.iterdir() if p.name != CHECKPOINT_NAME]
    assert len(leftovers) == 1 and leftovers[0].name.endswith(".tmp") and leftovers[0].stat().st_size > 0
    assert torch.load(ck_dir / CHECKPOINT_NAME, weights_only=True)["epoch"] == 3
    lost_2 = 6 - 3  # epochs 4-6 were trained again and lost

    # 3. Resumed here to the end.
    resumed = CountVAE(adata, **ct.MODEL_KW).train(checkpoint_dir=ck_dir, resume=True, **ct.TRAIN_KW)
    assert not [p for p in ck_dir.iterdir() if p.name != CHECKPOINT_NAME]  # the leftover was removed, not read
    assert resumed.history["resumed_from_epoch"] == 3
    assert resumed.history["epoch"] == straight.history["epoch"] == list(range(1, ct.MAX_EPOCHS + 1))
    assert resumed.history["validation_elbo"] == straight.history["validation_elbo"]
    _assert_same_weights(_state(resumed), _state(straight), atol=1e-6)
    assert max(lost_1, lost_2) <= ct.CHECKPOINT_EVERY
    with capsys.disabled():
        print(f"\n[crash test] work lost: {lost_1:.1f} epochs (kill mid-epoch), {lost_2} epochs (kill mid-write); "
              f"checkpoint interval {ct.CHECKPOINT_EVERY} epochs")
