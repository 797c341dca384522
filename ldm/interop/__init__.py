"""Interoperability with diffusers: export our models as diffusers folders and import them back.

- `export_diffusers(model, config, out_dir)` / `import_diffusers(dir)` (ldm.interop.folder);
- key maps per architecture: `unet` (UNetModel <-> UNet2DConditionModel / UNet2DModel),
  `autoencoder` (AutoencoderKL / VQModel), `text` (CLIP text encoder + tokenizer files);
- `LDMClassConditionalPipeline` for class-conditional LDMs (ldm.interop.pipelines, imported lazily).
Every key transform is exact (renames, reshapes, splits), so a round trip is bit-identical.
"""
from ldm.interop.folder import export_diffusers, import_diffusers
from ldm.interop.keymap import InteropError

__all__ = ["export_diffusers", "import_diffusers", "InteropError", "LDMClassConditionalPipeline"]


def __getattr__(name: str):
    if name in ("LDMClassConditionalPipeline", "ClassEmbedding"):
        from ldm.interop import pipelines
        return getattr(pipelines, name)
    raise AttributeError(name)
