"""dapo-inspect offline package: DAPO model, training, evaluation, bake (writes artifacts)."""
