"""Diffusion math shared by the models and samplers; no Lightning, no networks.

* `schedule`: beta schedules, every derived quantity (the registered buffers), the `Schedule` value.
* `denoiser`: the one copy of the eps / x0 / v conversions, and the `Denoiser` over a network call.
* `objectives`: q_sample, posteriors, training targets and the DDPM / LDM loss.
* `weighting`, `recipes`: opt-in loss weightings (min-SNR, P2, EDM) and training-noise recipes.
* `conditioning`: the conditioning routing tables, ucg_rate dropout, conditioning dicts.
* `tiling`: patch-wise processing of large images (split_input_params).
"""
