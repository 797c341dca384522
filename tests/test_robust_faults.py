"""Fault injection (issue 13): runs of main.py on the toy model are killed with SIGKILL at
seeded random points and in the middle of checkpoint writes, fed NaNs, raced by a second writer,
given truncated / weights-only / mismatched checkpoints through every entry point, and a disk
that fills up. After each: no checkpoint file is corrupt or lost, no temporary file is left once
the next run starts, and a resumed run ends bit-identical to an uninterrupted one.

The totals are printed (`pytest -s`) as `FAULTS: ...` lines."""
from __future__ import annotations

import errno
import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import main
from ldm.checkpoint import CheckpointError
from ldm.training import NonFiniteError, ResumeError, RunLockedError
from test_main_toy import ROOT, toy_config

pytestmark = pytest.mark.slow
HARNESS = Path(__file__).with_name("fault_harness.py")
MAX_STEPS = 12
COMMON = ["lightning.trainer.max_steps=%d" % MAX_STEPS, "lightning.modelcheckpoint.params.every_n_train_steps=3"]
COUNTS = {"kills": 0, "kills_mid_save": 0, "nan_injections": 0, "bad_files": 0, "lost_or_corrupt": 0}


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the same arithmetic as the child processes
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    print("\nFAULTS: " + ", ".join(f"{k}={v}" for k, v in COUNTS.items()))


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _ckpt(run: Path, name: str = "last.ckpt") -> dict:
    return torch.load(run / "checkpoints" / name, map_location="cpu", weights_only=True)


def _all_checkpoints_load(run: Path) -> int:
    """Every *.ckpt in the run loads (weights_only); returns how many. Counts corrupt ones."""
    n = 0
    for p in (run / "checkpoints").rglob("*.ckpt"):
        try:
            torch.load(p, map_location="cpu", weights_only=True)
            n += 1
        except Exception:  # noqa: BLE001
            COUNTS["lost_or_corrupt"] += 1
            raise AssertionError(f"corrupt checkpoint {p}")
    return n


def _tmp_files(run: Path) -> list[Path]:
    return sorted(p for p in run.rglob("*.tmp"))


def _child(args: list[str], **env: str) -> subprocess.Popen:
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}", **env)
    return subprocess.Popen([sys.executable, str(HARNESS), *args], cwd=ROOT, env=e,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"child ended early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"timed out waiting for {path}")
        time.sleep(0.02)


def _kill9(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    COUNTS["kills"] += 1


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """An uninterrupted run's final checkpoint."""
    tmp = tmp_path_factory.mktemp("ref")
    assert main.main(["-b", str(toy_config(tmp)), "-t", "-l", str(tmp / "logs"), "-n", "ref", *COMMON]) == 0
    return _ckpt(next((tmp / "logs").glob("*_ref")))


def _assert_same_as_reference(run: Path, ref: dict) -> None:
    got = _ckpt(run)
    assert got["global_step"] == ref["global_step"] == MAX_STEPS
    for k, v in ref["state_dict"].items():
        assert torch.equal(got["state_dict"][k], v), k
    sa, sb = ref["optimizer_states"][0]["state"], got["optimizer_states"][0]["state"]
    for i in sa:
        for m in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(sa[i][m], sb[i][m]), (i, m)


# seeded "random" kill points: (seconds after training started, or None) and (k-th save to die in, or 0)
RNG = random.Random(13)
KILLS = [(round(RNG.uniform(0.0, 0.5), 3), 0) for _ in range(3)] + [(None, 2), (None, 4)]


@pytest.mark.parametrize("delay,save_at", KILLS, ids=[f"t{d}" if d is not None else f"save{s}" for d, s in KILLS])
def test_kill9_then_resume_is_bit_identical(tmp_path: Path, reference: dict, delay, save_at, caplog) -> None:
    cfg, logs = toy_config(tmp_path), tmp_path / "logs"
    marker = tmp_path / "marker"
    env = {}
    if save_at:
        env.update(FAULT_SLOW_SAVE_AT=str(save_at), FAULT_MARKER=str(marker))
    proc = _child(["-b", str(cfg), "-t", "-l", str(logs), "-n", "kill", *COMMON, "model.params.step_sleep=0.06"], **env)
    if save_at:
        _wait_for(marker, proc)  # the child is half-way through writing a checkpoint
        COUNTS["kills_mid_save"] += 1
    else:
        _wait_for(tmp_path / "logs", proc)
        while not list(logs.glob("*_kill/checkpoints/last.ckpt")):  # the first save (step 3) is done
            _wait_for(tmp_path / "logs", proc)
            time.sleep(0.01)
        time.sleep(delay)  # then a seeded point of steps 3..12, saves included
    _kill9(proc)
    run = next(logs.glob("*_kill"))
    assert (run / "run.lock").exists()  # left behind by the killed writer
    if save_at:
        assert _tmp_files(run), "the kill was meant to hit a checkpoint write"
    assert _all_checkpoints_load(run) >= 1  # nothing half-written under a real name
    caplog.set_level("INFO")
    assert main.main(["-r", str(run), *COMMON]) == 0  # -r implies -t
    assert "taking over the stale lock" in caplog.text
    assert not _tmp_files(run) and not (run / "run.lock").exists()
    _all_checkpoints_load(run)
    _assert_same_as_reference(run, reference)


def test_nan_stops_with_the_cause_and_leaves_checkpoints_byte_identical(tmp_path: Path) -> None:
    cfg, logs = toy_config(tmp_path, model={"params": {"monitor": "train/loss"}}), tmp_path / "logs"
    every2 = ["lightning.modelcheckpoint.params.every_n_train_steps=2"]
    assert main.main(["-b", str(cfg), "-t", "-l", str(logs), "-n", "nan", "lightning.trainer.max_steps=4",
                      *every2]) == 0
    run = next(logs.glob("*_nan"))
    before = {p.name: _sha(p) for p in (run / "checkpoints").iterdir()}
    assert "last.ckpt" in before and len(before) >= 3  # last + top-k files
    with pytest.raises(NonFiniteError) as e:
        main.main(["-r", str(run), "lightning.trainer.max_steps=10", "model.params.nan_at_step=5", *every2])
    COUNTS["nan_injections"] += 1
    msg = str(e.value)
    print(f"\nNaN run message: {msg}\nsha256 last.ckpt before {before['last.ckpt']} after "
          f"{_sha(run / 'checkpoints' / 'last.ckpt')}")
    assert "global step 5" in msg and "train/loss=nan" in msg and "dataset indices [" in msg
    assert "no checkpoint was written" in msg
    assert {p.name: _sha(p) for p in (run / "checkpoints").iterdir()} == before
    assert not (run / "run.lock").exists()


def test_nan_batch_names_the_sample_and_skipping_trains_on(tmp_path: Path, caplog) -> None:
    # sample 7 of the dataset is NaN: its batch is bad once per epoch (12 steps = 3 epochs of 5 batches... 2.4)
    cfg = toy_config(tmp_path, train={"target": "test_main_toy.ToyImages", "params": {"n": 20, "nan_index": 7}})
    logs = tmp_path / "logs"
    with pytest.raises(NonFiniteError, match=r"dataset indices \[[^\]]*\b7\b"):
        main.main(["-b", str(cfg), "-t", "-l", str(logs), "-n", "stop", "lightning.trainer.max_steps=12"])
    COUNTS["nan_injections"] += 1
    assert not (next(logs.glob("*_stop")) / "checkpoints" / "last.ckpt").exists()  # nothing from a NaN run
    caplog.set_level("WARNING")
    assert main.main(["-b", str(cfg), "-t", "-l", str(logs), "-n", "skip", "lightning.trainer.max_steps=12",
                      "lightning.callbacks.nan_guard.params.max_skips=5"]) == 0
    COUNTS["nan_injections"] += 1
    ck = _ckpt(next(logs.glob("*_skip")))
    skipped = next(v for k, v in ck["callbacks"].items() if "NonFiniteGuard" in k)["skipped"]
    assert skipped == caplog.text.count("optimizer step skipped") >= 2
    assert all(torch.isfinite(v).all() for v in ck["state_dict"].values())


def test_nan_in_bf16_and_terminate_on_nan_map_to_the_guard(tmp_path: Path) -> None:
    cfg, logs = toy_config(tmp_path), tmp_path / "logs"
    with pytest.raises(NonFiniteError, match="global step 2"):
        main.main(["-b", str(cfg), "-t", "-l", str(logs), "-n", "bf16", "lightning.trainer.precision=bf16",
                   "lightning.trainer.terminate_on_nan=true", "model.params.nan_at_step=2",
                   "lightning.callbacks.nan_guard.params.max_skips=3"])
    COUNTS["nan_injections"] += 1


def test_nan_in_the_autoencoder_names_the_optimizer(tmp_path: Path) -> None:
    """Manual optimisation with two optimizers (autoencoder + discriminator)."""
    ae = {"target": "ldm.models.autoencoder.AutoencoderKL", "base_learning_rate": 1e-4, "params": {
        "embed_dim": 2, "lossconfig": {"target": "ldm.modules.losses.LPIPSWithDiscriminator", "params": {
            "disc_start": 0, "perceptual_weight": 0.0, "perceptual_weights": "random", "disc_num_layers": 1}},
        "ddconfig": {"double_z": True, "z_channels": 2, "resolution": 8, "in_channels": 3, "out_ch": 3, "ch": 32,
                     "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}}}
    cfg = toy_config(tmp_path, train={"target": "test_main_toy.ToyImages",
                                      "params": {"n": 8, "size": 8, "nan_index": 5}})
    from omegaconf import OmegaConf
    c = OmegaConf.load(cfg)
    c.model = ae
    c.data.params.validation.params.size = 8
    OmegaConf.save(c, cfg)
    with pytest.raises(NonFiniteError) as e:
        main.main(["-b", str(cfg), "-t", "-l", str(tmp_path / "logs"), "-n", "ae", "lightning.trainer.max_steps=6",
                   "lightning.callbacks.image_logger.params.disabled=true"])
    COUNTS["nan_injections"] += 1
    msg = str(e.value)
    assert "optimizer 0 of 2" in msg and "5" in msg.split("dataset indices")[1]


def test_two_writers_one_refused_and_sigusr1_never_kills(tmp_path: Path) -> None:
    cfg, logs = toy_config(tmp_path), tmp_path / "logs"
    stamp = "2000-01-01T00-00-00"  # the same -n in the same second
    proc = subprocess.Popen(
        [sys.executable, "main.py", "-b", str(cfg), "-t", "-l", str(logs), "-n", "twin", "lightning.trainer.max_steps=30",
         "model.params.step_sleep=0.1"],
        cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "tests"), LDM_RUN_NOW=stamp),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    # SIGUSR1 from the first moment on (while importing, building, training): saves or is ignored
    time.sleep(0.5)  # (only the interpreter's own start-up, before main.py's first lines, is not covered)
    t0, sent = time.time(), 0
    lock = logs / f"{stamp}_twin" / "run.lock"
    while not lock.exists() and time.time() - t0 < 120 and proc.poll() is None:
        proc.send_signal(signal.SIGUSR1)
        sent += 1
        time.sleep(0.25)
    assert lock.exists(), proc.stderr.read()[-2000:] if proc.poll() is not None else "no lock"
    os.environ["LDM_RUN_NOW"] = stamp
    try:
        with pytest.raises(RunLockedError, match=rf"being written by another run \(pid {proc.pid} on"):
            main.main(["-b", str(cfg), "-t", "-l", str(logs), "-n", "twin"])
    finally:
        os.environ.pop("LDM_RUN_NOW")
    with pytest.raises(RunLockedError, match="being written by another run"):  # -r before its first checkpoint
        main.main(["-r", str(logs / f"{stamp}_twin")])
    while not (lock.parent / "losses.jsonl").exists() and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)  # while training: summons a last.ckpt
    while not (lock.parent / "checkpoints" / "last.ckpt").exists() and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None
    with pytest.raises(RunLockedError):  # two -r on one folder
        main.main(["-r", str(logs / f"{stamp}_twin")])
    while proc.poll() is None:
        proc.send_signal(signal.SIGUSR1)
        sent += 1
        time.sleep(0.5)
    err = proc.stderr.read()
    assert proc.returncode == 0, err[-3000:]
    assert sent >= 3 and "SIGUSR1" in err
    assert not lock.exists()


def _toy_run(tmp_path: Path, name: str, *extra: str) -> Path:
    cfg, logs = toy_config(tmp_path), tmp_path / "logs"
    assert main.main(["-b", str(cfg), "-t", "-l", str(logs), "-n", name, "lightning.trainer.max_steps=2", *extra]) == 0
    return next(logs.glob(f"*_{name}"))


def test_bad_checkpoints_through_every_entry_point(tmp_path: Path) -> None:
    from omegaconf import OmegaConf
    from ldm.checkpoint import load_model_from_config, load_state_dict_file, save_safetensors
    run = _toy_run(tmp_path, "good")
    good = run / "checkpoints" / "last.ckpt"
    data = good.read_bytes()
    cases = 0

    def corrupt_run(name: str, payload: bytes) -> Path:
        bad = tmp_path / name / "logs" / "x" / "checkpoints"
        bad.mkdir(parents=True)
        (bad / "last.ckpt").write_bytes(payload)
        (bad.parent / "configs").mkdir()
        for c in (run / "configs").glob("*.yaml"):
            (bad.parent / "configs" / c.name).write_bytes(c.read_bytes())
        return bad.parent

    for label, payload in (("half", data[: len(data) // 2]), ("empty", b""), ("noise", os.urandom(4096))):
        bad_run = corrupt_run(label, payload)
        for argv in (["-r", str(bad_run)], ["-r", str(bad_run / "checkpoints" / "last.ckpt")],
                     ["-b", str(toy_config(tmp_path)), "-n", f"rfc{label}", "-l", str(tmp_path / "logs2"), "-t",
                      f"lightning.trainer.resume_from_checkpoint={bad_run / 'checkpoints' / 'last.ckpt'}"]):
            with pytest.raises(CheckpointError, match=r"cannot read checkpoint '.*last\.ckpt' \(\d+ bytes\)"):
                main.main(argv)
            cases += 1
        # the weight-loading entry points (model ckpt_path, scripts, notebooks) share ldm.checkpoint
        with pytest.raises(CheckpointError, match="truncated .* or corrupt"):
            load_state_dict_file(bad_run / "checkpoints" / "last.ckpt")
        cases += 1
    # a truncated .safetensors
    st = tmp_path / "w.safetensors"
    save_safetensors({"a": torch.zeros(256)}, st)
    st.write_bytes(st.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"w\.safetensors' \(100 bytes\): not a complete safetensors"):
        load_state_dict_file(st)
    cases += 1
    # model.params.ckpt_path of a real model (the autoencoder) with a truncated file
    ae = OmegaConf.load(ROOT / "configs" / "quickstart" / "autoencoder_kl_digits.yaml")
    half = tmp_path / "half" / "logs" / "x" / "checkpoints" / "last.ckpt"
    ae.model.params.ckpt_path = str(half)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_model_from_config(ae, None)
    cases += 1
    # weights only (a released checkpoint): one line saying what to use instead
    weights = tmp_path / "released.ckpt"
    torch.save({"state_dict": _ckpt(run)["state_dict"], "global_step": 7}, weights)
    with pytest.raises(ResumeError, match=r"holds weights only .* use model\.params\.ckpt_path="):
        main.main(["-b", str(toy_config(tmp_path)), "-n", "rel", "-l", str(tmp_path / "logs3"), "-t",
                   f"lightning.trainer.resume_from_checkpoint={weights}"])
    with pytest.raises(ResumeError, match=r"-r takes a main.py log folder .* model\.params\.ckpt_path="):
        main.main(["-r", str(weights)])
    # released EMA counters (benign keys) in a full state: still not Lightning's raw dump
    full = _ckpt(run)
    full["state_dict"]["model_ema.decay"] = torch.tensor(0.999)
    full["state_dict"]["model_ema.num_updates"] = torch.tensor(7)
    torch.save(full, weights)
    with pytest.raises(ResumeError, match=r"known-benign .*model_ema"):
        main.main(["-b", str(toy_config(tmp_path)), "-n", "ema", "-l", str(tmp_path / "logs3"), "-t",
                   f"lightning.trainer.resume_from_checkpoint={weights}"])
    # a mismatched model: the project's report
    with pytest.raises(CheckpointError, match=r"(?s)does not match ToyModel.*shape mismatch.*enc\.weight"):
        main.main(["-r", str(run), "model.params.hidden=6"])
    cases += 4
    COUNTS["bad_files"] += cases
    assert _sha(good) == hashlib.sha256(data).hexdigest()


def test_disk_full_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    from pytorch_lightning.plugins.io import TorchCheckpointIO
    run = _toy_run(tmp_path, "full")
    before = _sha(run / "checkpoints" / "last.ckpt")
    orig = TorchCheckpointIO.save_checkpoint

    def failing(self, checkpoint, path, storage_options=None):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", failing)
    with pytest.raises(OSError, match=r"cannot write checkpoint .*last\.ckpt: No space left on device \(the "
                                      r"previous last\.ckpt is intact"):
        main.main(["-r", str(run), "lightning.trainer.max_steps=4"])
    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", orig)
    assert _sha(run / "checkpoints" / "last.ckpt") == before and not _tmp_files(run)
    COUNTS["bad_files"] += 1


def test_unwritable_log_folder_is_said_first(tmp_path: Path, monkeypatch) -> None:
    import builtins
    real_open = builtins.open

    def ro_open(path, mode="r", *a, **k):
        if ".write-test-" in str(path):
            raise OSError(errno.EROFS, "Read-only file system")
        return real_open(path, mode, *a, **k)
    monkeypatch.setattr(builtins, "open", ro_open)
    from ldm.training import LogFolderError
    with pytest.raises(LogFolderError, match="is on a read-only file system"):
        main.main(["-b", str(toy_config(tmp_path)), "-t", "-l", str(tmp_path / "logs")])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_gpus_without_cuda_says_how_to_run_on_cpu(tmp_path: Path) -> None:
    from ldm.util import ConfigError
    with pytest.raises(ConfigError, match=r"--gpus 0 asks for GPU.*no CUDA device was found.*leave out --gpus"):
        main.main(["-b", str(toy_config(tmp_path)), "-t", "-l", str(tmp_path / "logs"), "--gpus", "0"])


def test_changed_learning_rate_on_resume_is_applied(tmp_path: Path, caplog) -> None:
    run = _toy_run(tmp_path, "lr")
    caplog.set_level("INFO")
    assert main.main(["-r", str(run), "lightning.trainer.max_steps=3", "model.base_learning_rate=2.0e-4"]) == 0
    assert "learning rate 4.000e-04 (checkpoint) -> 8.000e-04 (this config); applied" in caplog.text
    ck = _ckpt(run)
    assert ck["optimizer_states"][0]["param_groups"][0]["initial_lr"] == pytest.approx(8e-4)
    assert ck["lr_schedulers"][0]["base_lrs"] == [pytest.approx(8e-4)]
    assert ck["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(8e-4 * 0.4)  # warm-up: (3 + 1) / 10


def test_no_writer_ever_writes_non_finite_weights(tmp_path: Path) -> None:
    """AtomicCheckpointIO (every ModelCheckpoint, the emergency save) refuses a NaN state."""
    from ldm.training import AtomicCheckpointIO
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, target)
    before = _sha(target)
    with pytest.raises(NonFiniteError, match=r"not writing .*last\.ckpt: non-finite weights in w"):
        io.save_checkpoint({"state_dict": {"w": torch.tensor([1.0, float("inf"), 0.0])}}, target)
    assert _sha(target) == before and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
