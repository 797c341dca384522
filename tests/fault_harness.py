"""Runs main.py's main() in a child process with faults the fault-injection tests ask for
through environment variables (used by tests/test_robust_faults.py only):

FAULT_SLOW_SAVE_AT=k   the k-th checkpoint write (1-based) writes half its bytes, creates
                       $FAULT_MARKER and sleeps, so the test can kill -9 it mid-write;
"""
from __future__ import annotations

import io
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

torch.set_num_threads(1)


def _install() -> None:
    from pytorch_lightning.plugins.io import TorchCheckpointIO

    slow_at = int(os.environ.get("FAULT_SLOW_SAVE_AT", "0"))
    if slow_at:
        orig = TorchCheckpointIO.save_checkpoint
        count = {"n": 0}

        def save_checkpoint(self, checkpoint, path, storage_options=None):
            count["n"] += 1
            if count["n"] != slow_at:
                return orig(self, checkpoint, path, storage_options)
            buf = io.BytesIO()
            torch.save(checkpoint, buf)
            data = buf.getvalue()
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])
                f.flush()
                Path(os.environ["FAULT_MARKER"]).write_text(str(path))
                time.sleep(60)
                f.write(data[len(data) // 2:])

        TorchCheckpointIO.save_checkpoint = save_checkpoint


if __name__ == "__main__":
    import main
    _install()
    sys.exit(main.main(sys.argv[1:]))
