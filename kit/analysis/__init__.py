"""Reading, scoring and patching what a model's attention does.

- `probe`: runs a trained model on one text (or image) and collects every
  attention map with its tokens and the vectors it used; compares two texts.
- `interp`: pattern scores, value-weighted norms, attention rollout, head
  ablation masks (numpy).
- `patching`: activation and attribution patching over the models' hook points
  (`kit.hooks`).

Figures and pages of the results are in `kit.views`.
"""
