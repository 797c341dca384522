"""Multi-GPU training strategies for LatentDiffusion, as `lightning.trainer.strategy` targets.

`LDMFSDPStrategy` is Lightning's FSDPStrategy (PyTorch FSDP, `use_orig_params=True`) set up
the way a latent diffusion model wants it:
- the UNet is sharded block by block: one FSDP unit per ResBlock / SpatialTransformer /
  AttentionBlock (`wrap_blocks`), the rest of the UNet in the root unit;
- activation checkpointing per block (`activation_checkpointing`), through Lightning's
  `activation_checkpointing_policy` (leave the UNet's own `use_checkpoint` off with it);
- the frozen first stage and a frozen conditioning encoder are *not* sharded: they are
  FSDP's `ignored_modules`, kept whole (replicated) on every rank, as they get no gradients
  and sharding them would only add all-gathers to every encode/decode; a trainable
  conditioning encoder (`cond_stage_trainable`) is sharded with the UNet;
- `use_orig_params=True` keeps parameter names (state-dict keys, EMA buffer names) and lets
  frozen and trainable parameters share a unit and `torch.compile` see the original modules;
- the EMA (`LitEma`) is updated and copied on whole parameters, gathered around it
  (`summon_full_params`; one extra all-gather per step, the EMA itself stays unsharded --
  `LitEma(offload=True)` keeps it off the GPU).

The presets `configs/scale/*.yaml` choose it per model size (README "Scale-out presets").
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

BLOCK_NAMES = ("ResBlock", "SpatialTransformer", "AttentionBlock")   # FSDP units / checkpointed


def unet_block_classes(names: Iterable[str] = BLOCK_NAMES) -> set[type[nn.Module]]:
    """The UNet block classes named in `names` (classes, as FSDP wrap policies need them)."""
    from ldm.modules import attention
    from ldm.modules.diffusionmodules import openaimodel
    classes = set()
    for name in names:
        cls = getattr(openaimodel, name, None) or getattr(attention, name, None)
        if cls is None:
            raise ValueError(f"unknown UNet block class {name!r}; known: {BLOCK_NAMES}")
        classes.add(cls)
    return classes


def replicated_modules(model: nn.Module) -> list[nn.Module]:
    """The parts of a LatentDiffusion kept whole on every rank: the first stage and a frozen
    conditioning encoder (parameters without gradients)."""
    out = []
    for name in ("first_stage_model", "cond_stage_model"):
        m = getattr(model, name, None)
        if isinstance(m, nn.Module) and not any(p.requires_grad for p in m.parameters()):
            out.append(m)
    return out


def _fsdp_base() -> type:
    from pytorch_lightning.strategies import FSDPStrategy
    return FSDPStrategy


class LDMFSDPStrategy(_fsdp_base()):
    """FSDPStrategy sharding the UNet per block, the frozen stages replicated (module doc)."""

    def __init__(self, wrap_blocks: bool = True, activation_checkpointing: bool = True,
                 sharding_strategy: str = "FULL_SHARD", block_names: Iterable[str] = BLOCK_NAMES,
                 cpu_offload: bool = False, limit_all_gathers: bool = True, **kwargs: Any):
        # wrap_blocks: one FSDP unit per UNet block (else one unit for everything trainable)
        # activation_checkpointing: recompute each block's activations in the backward pass
        # sharding_strategy: FULL_SHARD (params, grads, optimizer state; ZeRO-3) | SHARD_GRAD_OP
        #   (grads + optimizer state; ZeRO-2, fewer all-gathers) | HYBRID_SHARD (FULL within a node)
        #   | NO_SHARD (DDP-like)
        # block_names: UNet block classes that become units / are checkpointed
        # cpu_offload: keep sharded parameters in host memory between uses (the largest models)
        # limit_all_gathers: rate-limit prefetching all-gathers (bounds peak memory)
        blocks = unet_block_classes(block_names)
        kwargs.setdefault("use_orig_params", True)
        super().__init__(auto_wrap_policy=blocks if wrap_blocks else None,
                         activation_checkpointing_policy=blocks if activation_checkpointing else None,
                         sharding_strategy=sharding_strategy, cpu_offload=cpu_offload,
                         limit_all_gathers=limit_all_gathers, **kwargs)
        self.block_names = tuple(block_names)

    def _setup_model(self, model: nn.Module) -> nn.Module:
        ignored = replicated_modules(model)
        if ignored:
            self.kwargs["ignored_modules"] = ignored
            for m in ignored:                    # FSDP moves only what it manages
                m.to(self.root_device)
        wrapped = super()._setup_model(model)
        ema = getattr(model, "model_ema", None)
        if ema is not None and hasattr(ema, "full_params_context"):
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            # the EMA reads (update) and writes (copy_to) whole parameters: gather them around it
            def gather(writeback: bool):
                return FSDP.summon_full_params(wrapped, writeback=writeback, rank0_only=False)
            ema.full_params_context = gather
        return wrapped


def n_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def memory_per_rank_gib(n_params: int, world_size: int, sharding_strategy: str = "FULL_SHARD",
                        ema: bool = True, ema_offload: bool = False, param_bytes: int = 4) -> float:
    """Rough model-state memory per rank (GiB) of AdamW training: params, grads, two moments
    (and the EMA), sharded as the strategy shards them; activations excluded."""
    shard = {"FULL_SHARD": (True, True, True), "SHARD_GRAD_OP": (False, True, True),
             "HYBRID_SHARD": (True, True, True), "NO_SHARD": (False, False, False)}[sharding_strategy]
    per = [param_bytes, param_bytes, 8]
    total = sum(b * n_params / (world_size if s else 1) for b, s in zip(per, shard))
    if ema and not ema_offload:
        total += 4 * n_params
    return total / 2 ** 30
