"""Evaluation: generative metrics (FID, IS, KID, precision/recall), reconstruction metrics
(rFID, PSNR, SSIM, LPIPS/PSIM), resumable sampling for evaluation and the paper's protocols.

    features          Inception-V3 features from local weights (or flagged random weights)
    fid               FID / KID / IS from features
    prdc              precision / recall (k-NN manifolds), density / coverage
    image_metrics     PSNR, SSIM, LPIPS per image
    reference_stats   cached dataset-split statistics
    sample_for_eval   numbered, seeded, resumable, multi-rank sample generation
    presets, report, pipeline   protocols, output, end to end (scripts/evaluate.py)
"""
from ldm.eval.fid import (feature_statistics, fid_from_features, frechet_distance, inception_score,
                          kernel_inception_distance)
from ldm.eval.image_metrics import psnr, ssim, to_uint8
from ldm.eval.prdc import precision_recall

__all__ = ["feature_statistics", "fid_from_features", "frechet_distance", "inception_score",
           "kernel_inception_distance", "precision_recall", "psnr", "ssim", "to_uint8"]
