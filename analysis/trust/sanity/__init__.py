"""Sanity checks for relevance maps: does a map depend on the model, and on the class explained?

Adebayo, Gilmer, Muelly, Goodfellow, Hardt, Kim, "Sanity Checks for Saliency Maps", NeurIPS 2018; Sixt,
Granz, Landgraf, "When Explanations Lie: Why Many Modified BP Attributions Fail", ICML 2020 (z+-style rules,
as FG-CAM and LRP use below the CAM layer, can fail the randomisation check: products of non-negative
propagation matrices converge to a map that no longer depends on the relevance above them).

* **Cascading model randomisation.** On a copy of the model, re-initialise the classifier head, then the
  top block, then the next one down, cumulatively, and after each step compare each method's map (for the
  class the original model predicted) with the map of the original model. A map that barely changes
  describes the image, not what the model learnt.
* **Class sensitivity.** Compare the map of the predicted class with the map of another class, drawn at
  random per image (seeded). A map that barely changes does not explain the decision.

How the blocks are found (`randomisation_blocks`, ours; the paper randomises Inception v3's named blocks):
every module that owns parameters or buffers and is used in the traced forward pass is one *unit*. Units
above the model's last spatial layer (the default CAM layer, whichever CAM layer the explainer uses, so
that the cascade is the same for every choice of it) form the **head**. The others are grouped by the
shortest prefix of their module name whose parent is a container (``nn.Sequential``, ``nn.ModuleList``,
``nn.ModuleDict``), else by their top-level module: ResNet's ``layer3.1``, EfficientNet-Lite's
``_blocks.7``, VGG's ``features.10``, Inception's ``Mixed_6b``. A group without a weight of two or more
dimensions (a batch norm on its own) joins the group before it in the graph (VGG's ``features.0 +
features.1``, ResNet's ``conv1 + bn1``). Blocks are ordered by where they start in the graph; the cascade
goes from the last one down.

How a unit is re-initialised: its own ``reset_parameters()`` (what a freshly built model holds before
training: Kaiming-uniform weights for convolutions and linear layers; a batch norm becomes weight 1, bias 0,
running mean 0 and variance 1); a unit without one gets each parameter's entries randomly permuted (its
weight distribution kept, what it learnt destroyed). Seeded per block, on the CPU, so the random weights
do not depend on the device, the batch or the depths chosen. The caller's model is never touched.

How maps are compared (per image; the mean and a 95% Student-t confidence interval over the images):

* variants: ``abs`` -- |map| at the map's own resolution (the input's, the intermediate layer's; the CAM's
  own for the CAM), Adebayo et al.'s main variant; ``signed`` -- the map itself (a map whose sign flips
  scores -1 here and 1 in ``abs``); ``positive_pooled`` -- the positive part adaptive-average-pooled to
  D x D and scaled to unit mass, what the dashboard's clustering reads (`analysis.pipeline.scores.descriptors`; a
  map without positive relevance has no descriptor: undefined).
* Spearman rank correlation (average ranks for ties; scipy.stats.spearmanr's definition); undefined (NaN,
  left out of the mean and counted) when a map is constant.
* SSIM (Wang et al. 2004) with scikit-image's defaults (7 x 7 uniform window, K1 0.01, K2 0.03, sample
  covariance, mean over the windows inside the map) on each map min-max scaled to [0, 1]; a smaller window
  (the largest odd size that fits) on maps under 7 pixels a side, NaN under 3.

Methods that ignore the model (the random map, the edge map) score exactly 1 in both checks: they are the
reference for "the map shows the image". The CAM's map is compared at its own layer for every layer row.

Modules: blocks (the model's blocks, their randomisation, the cascade's steps), similarity (Spearman, SSIM),
checks (the checks), summary (tables, curves, the sentence). The public names are re-exported here.
"""
from analysis.trust.sanity.blocks import (Block, CHECKS, DEFAULT_POOLED_SIZE, METRICS, SSIM_WINDOW, VARIANTS,
                                          VARIANT_LABELS, blocks_below_head, default_depths, load_tensors,
                                          model_blocks, parse_depths, randomisation_blocks, randomised_copy,
                                          randomised_tensors, resolve_depths, short_step_label, step_label)
from analysis.trust.sanity.similarity import map_variants, rank_rows, spearman_rows, ssim_rows, ssim_window
from analysis.trust.sanity.checks import SanityChecks, layer_size, other_classes, sanity_checks
from analysis.trust.sanity.summary import (format_blocks, format_sanity_table, mean_and_ci, sanity_curves,
                                           sanity_sentence, summarise_sanity)


__all__ = ["Block", "CHECKS", "DEFAULT_POOLED_SIZE", "METRICS", "SSIM_WINDOW", "SanityChecks", "VARIANTS",
           "VARIANT_LABELS", "blocks_below_head", "default_depths", "format_blocks", "format_sanity_table",
           "layer_size", "load_tensors", "map_variants", "mean_and_ci", "model_blocks", "other_classes",
           "parse_depths", "randomisation_blocks", "randomised_copy", "randomised_tensors", "rank_rows",
           "resolve_depths", "sanity_checks", "sanity_curves", "sanity_sentence", "short_step_label", "spearman_rows",
           "ssim_rows", "ssim_window", "step_label", "summarise_sanity"]
