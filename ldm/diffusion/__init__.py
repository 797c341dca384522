"""Diffusion math shared by the models and samplers; no Lightning, no networks.

* `schedule`: beta schedules and every derived quantity (the registered buffers).
* `objectives`: q_sample, posteriors, eps / x0 / v conversions, training targets and losses.
* `conditioning`: conditioning dicts, classifier-free-guidance dropout (ucg), cond schedules.
* `tiling`: patch-wise processing of large images (split_input_params).
"""
