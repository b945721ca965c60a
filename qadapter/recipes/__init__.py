"""Recipes: the jobs, above the library and below the CLI.

* :mod:`.config`: a job's settings (:class:`~qadapter.recipes.config.JobArguments`, the presets in
  ``presets/*.yaml``, argv / YAML merging), shared by ``qadapter train`` and ``qadapter compare``;
* :mod:`.train`: the main job, :func:`~qadapter.recipes.train.run_training` (load, split by prompt,
  train, save, measure, show);
* :mod:`.compare`: Q-Adapter against the paper's baselines on both sides of the trade-off,
  :func:`~qadapter.recipes.compare.run_comparison`.

The library (everything outside ``recipes/`` and ``commands/``) never imports a recipe.
"""
