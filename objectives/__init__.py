"""Training side of the service: config, data, model and the epoch loop, free of optuna and mlflow.

Kept import-free so `import objectives` is cheap; import the submodules you need
(`objectives.settings`, `objectives.train`, ...).
"""
