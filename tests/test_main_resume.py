"""main.py runs in-process on the toy model: an interrupted-and-resumed run equals an
uninterrupted one (weights, EMA buffer, Adam moments, LR schedule, step, epoch, the losses of
every later step), a failure or SIGUSR1 during fit writes last.ckpt, and that resumes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import main
from test_main_toy import toy_config

pytestmark = pytest.mark.slow


def _run(*args: str) -> None:
    assert main.main(list(args)) == 0


def _ckpt(run: Path) -> dict:
    # weights_only: our checkpoints must load with torch.load's safe default
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def _losses(run: Path) -> list[tuple[int, float, int]]:
    rows = [json.loads(line) for line in (run / "losses.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["epoch"]) for r in rows]


def test_resume_mid_epoch_equals_uninterrupted_run(tmp_path: Path) -> None:
    cfg, logs = toy_config(tmp_path), tmp_path / "logs"
    # 20 samples / batch 4 = 5 batches per epoch: stop mid-epoch 0, finish in epoch 2
    _run("-b", str(cfg), "-t", "-l", str(logs), "-n", "full", "lightning.trainer.max_steps=12")
    _run("-b", str(cfg), "-t", "-l", str(logs), "-n", "part", "lightning.trainer.max_steps=3")
    full, part = next(logs.glob("*_full")), next(logs.glob("*_part"))
    assert _ckpt(part)["global_step"] == 3
    _run("-r", str(part), "-t", "lightning.trainer.max_steps=12")

    a, b = _ckpt(full), _ckpt(part)
    assert a["global_step"] == b["global_step"] == 12
    assert a["epoch"] == b["epoch"] == 2
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:  # weights and the EMA buffer
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    for i in sa:
        for moment in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(torch.as_tensor(sa[i][moment]), torch.as_tensor(sb[i][moment])), (i, moment)
    assert a["lr_schedulers"][0]["last_epoch"] == b["lr_schedulers"][0]["last_epoch"] == 12
    assert a["lr_schedulers"][0]["_last_lr"] == b["lr_schedulers"][0]["_last_lr"]
    # every step's loss (same batches, same noise) and epoch; the resumed run continued at step 3
    assert _losses(part) == _losses(full)
    assert [s for s, _, _ in _losses(part)] == list(range(12))
    # the resumed run logged into the same folder and saved its configs beside the first ones
    assert len(list((part / "configs").glob("*.yaml"))) == 4
    assert (part / "hash_rank0.txt").read_text() == (full / "hash_rank0.txt").read_text()


def test_failure_during_fit_saves_last_ckpt_and_resumes(tmp_path: Path) -> None:
    cfg, logs = toy_config(tmp_path, model={"params": {"fail_at_step": 2}}), tmp_path / "logs"
    with pytest.raises(RuntimeError, match="toy failure"):
        main.main(["-b", str(cfg), "-t", "-l", str(logs), "-n", "fail"])
    run = next(logs.glob("*_fail"))
    assert _ckpt(run)["global_step"] == 2  # the two completed steps were saved before re-raising
    # resume from the checkpoint file, without the failure
    _run("-r", str(run / "checkpoints" / "last.ckpt"), "-t", "model.params.fail_at_step=-1",
         "lightning.trainer.max_steps=4")
    assert _ckpt(run)["global_step"] == 4
    assert [s for s, _, _ in _losses(run)] == [0, 1, 2, 3]


def test_sigusr1_saves_last_ckpt_at_the_next_batch_end(tmp_path: Path) -> None:
    cfg, logs = toy_config(tmp_path, model={"params": {"signal_at_step": 1}}), tmp_path / "logs"
    _run("-b", str(cfg), "-t", "-l", str(logs), "-n", "usr1", "lightning.trainer.max_steps=5")
    run = next(logs.glob("*_usr1"))
    # the signal arrived during step index 1; the checkpoint follows that step (global_step 2),
    # then the final one at max_steps
    assert (run / "saves.txt").read_text().split() == ["2", "5"]
    assert _ckpt(run)["global_step"] == 5


def test_setup_failure_does_not_replace_a_good_last_ckpt(tmp_path: Path) -> None:
    cfg, logs = toy_config(tmp_path), tmp_path / "logs"
    _run("-b", str(cfg), "-t", "-l", str(logs), "-n", "ok", "lightning.trainer.max_steps=2")
    run = next(logs.glob("*_ok"))
    before = (run / "checkpoints" / "last.ckpt").read_bytes()
    with pytest.raises(Exception):  # val_check_interval larger than an epoch: Lightning fails in setup
        main.main(["-r", str(run), "-t", "lightning.trainer.max_steps=4", "lightning.trainer.val_check_interval=50"])
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == before


def test_should_stop_mid_epoch_saves_that_step_and_resumes_mid_epoch(tmp_path: Path) -> None:
    """max_time and EarlyStopping end a run through trainer.should_stop: last.ckpt must hold the
    step it stopped at, and resuming must continue in the same epoch on the next batches."""
    cfg, logs = toy_config(tmp_path, model={"params": {"stop_at_step": 1}}), tmp_path / "logs"
    _run("-b", str(cfg), "-t", "-l", str(logs), "-n", "stop", "lightning.trainer.max_steps=12")
    run = next(logs.glob("*_stop"))
    assert (run / "saves.txt").read_text().split() == ["2"]
    ck = _ckpt(run)
    assert ck["global_step"] == 2 and ck["epoch"] == 0
    _run("-r", str(run), "-t", "model.params.stop_at_step=-1", "lightning.trainer.max_steps=5")
    (tmp_path / "plain").mkdir()
    _run("-b", str(toy_config(tmp_path / "plain")), "-t", "-l", str(logs), "-n", "nostop", "lightning.trainer.max_steps=5")
    assert _losses(run) == _losses(next(logs.glob("*_nostop")))
