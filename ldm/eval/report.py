"""Evaluation output: a table row in the paper's format and a JSON file with every number,
the protocol and the software versions."""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np

# column name -> (key in metrics, format, higher is better)
GENERATIVE_COLUMNS = [("FID", "fid", "{:.2f}"), ("IS", "is_mean", "{:.2f}"), ("KID", "kid_mean", "{:.4f}"),
                      ("Prec.", "precision", "{:.2f}"), ("Recall", "recall", "{:.2f}"), ("sFID", "sfid", "{:.2f}"),
                      ("FD-DINOv2", "fd_dinov2", "{:.2f}"), ("CMMD", "cmmd", "{:.3f}"),
                      ("CLIP score", "clip_score", "{:.2f}")]
AUTOENCODER_COLUMNS = [("rFID", "rfid", "{:.2f}"), ("R-IS", "ris_mean", "{:.2f}"), ("PSNR", "psnr", "{:.2f}"),
                       ("PSIM", "psim", "{:.2f}"), ("SSIM", "ssim", "{:.2f}")]


def software_versions() -> dict[str, Any]:
    out: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform()}
    for mod in ("torch", "torchvision", "torch_fidelity", "numpy", "scipy", "PIL", "omegaconf", "ldm"):
        try:
            m = __import__(mod)
            out[mod] = getattr(m, "__version__", "installed")
        except Exception:  # noqa: BLE001 - a missing optional package is just reported
            out[mod] = None
    try:
        import torch

        out["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            out["gpu"] = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001
        pass
    try:
        root = Path(__file__).resolve().parents[2]
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        if rev.returncode == 0:
            out["ldm_git_commit"] = rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except Exception:  # noqa: BLE001
        pass
    return out


def _fmt(value: Any, fmt: str, std: Any = None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    s = fmt.format(value)
    if std is not None:
        s += " ± " + fmt.format(std)
    return s


def _cell(metrics: dict, key: str, fmt: str) -> str:
    v = metrics.get(key)
    if isinstance(v, dict):  # {"mean", "std"} of per-image metrics
        return _fmt(v.get("mean"), fmt, v.get("std"))
    std_key = key.replace("_mean", "_std") if key.endswith("_mean") else None
    return _fmt(v, fmt, metrics.get(std_key) if std_key else None)


def table_rows(label: str, metrics: dict, columns: list, paper: Optional[dict] = None) -> str:
    """Markdown header + our row (+ the paper's row when known), only columns we have."""
    cols = [c for c in columns if c[1] in metrics or (paper and c[1] in paper)]
    lines = ["| Method | " + " | ".join(c[0] for c in cols) + " |", "|---" * (len(cols) + 1) + "|",
             f"| {label} | " + " | ".join(_cell(metrics, k, f) for _, k, f in cols) + " |"]
    if paper:
        lines.append(f"| {label} (paper) | " + " | ".join(_cell(paper, k, f) for _, k, f in cols) + " |")
    return "\n".join(lines)


def _jsonable(x: Any) -> Any:
    try:
        from omegaconf import OmegaConf
        if OmegaConf.is_config(x):   # config sections (DictConfig / ListConfig) of the protocol
            x = OmegaConf.to_container(x, resolve=True)
    except ImportError:
        pass
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


def write_json(path: str | Path, result: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    result = dict(result)
    result.setdefault("software", software_versions())
    result.setdefault("finished_at", datetime.datetime.now().astimezone().isoformat(timespec="seconds"))
    result.setdefault("command", " ".join(sys.argv))
    result.setdefault("cwd", os.getcwd())
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_jsonable(result), indent=2, ensure_ascii=False))
    os.replace(tmp, path)
    return path


def format_report(result: dict) -> str:
    """Human-readable summary: warnings first (random-weight networks), then the table."""
    cols = AUTOENCODER_COLUMNS if result.get("task") == "autoencoder" else GENERATIVE_COLUMNS
    lines = [f"!!! {w}" for w in result.get("warnings", [])]
    label = result.get("row") or "ours"
    if result.get("warnings"):   # the flag stands in the row itself, where a copied table keeps it
        label += " [RANDOM-WEIGHT networks: not comparable]"
    lines.append(table_rows(label, result["metrics"], cols, result.get("paper")))
    lines += [f"!!! {w}" for w in result.get("warnings", [])]
    return "\n".join(lines)
