"""What shows attention: figures (matplotlib), the offline HTML viewer and notebook views.

- `figures`: heatmaps per layer and head (`plot_attention`), patching maps
  (`plot_patching`).
- `patches`: a Vision Transformer's class-token attention laid over its image.
- `viewer`: the offline HTML page (head, model, neuron, diff and patching views),
  its HTML/CSS/JS under `assets/`.
- `notebook`: the viewer as notebook objects (`head_view`, `model_view`,
  `neuron_view`, `diff_view`, `patching_view`, `View`), shown inline and saved as HTML, PNG or SVG;
  `head_view(weights, tokens)` shows a model of your own in one call.

Everything here draws; what it draws is computed in `kit.analysis` and the models.
"""

from kit.views.figures import figure_format, plot_attention, plot_patching
from kit.views.notebook import (
    View,
    diff_view,
    from_arrays,
    head_view,
    model_view,
    neuron_view,
    patching_view,
)
from kit.views.patches import class_token_maps, patch_attention_html, plot_patch_attention
from kit.views.viewer import attention_html, write_attention_html

__all__ = [
    "View",
    "attention_html",
    "class_token_maps",
    "diff_view",
    "figure_format",
    "from_arrays",
    "head_view",
    "model_view",
    "neuron_view",
    "patch_attention_html",
    "patching_view",
    "plot_attention",
    "plot_patch_attention",
    "plot_patching",
    "write_attention_html",
]
