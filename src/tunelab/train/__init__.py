"""Training: `launch.train(cfg)` runs a pipeline of stages (`pipeline.py`) or one run (`run.run`, THE
orchestrator for every objective), which validates everything first (`prepare.py`), drives THE loop
(`loop.fit`: accumulate, normalise by Σn, clip, step, hooks, log, evaluate, checkpoint, resume), and writes the
artifacts (`artifacts.py`). May import every layer above it (config, data, models, adapters, objectives,
sampling/generate, eval); never export, lab or cli.
"""
