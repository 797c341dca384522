"""Text-image data for LDM's text-to-image config (`text2img256`): `pytorch_dataset.PreviewsTrain/Validation`."""
