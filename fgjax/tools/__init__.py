"""Command-line tools: `python -m fgjax.tools.convert ...` (pretrained weights into an fgjax
params file), `python -m fgjax.tools.ensemble W1 W2 ...` (weighted ensembles of runs: test-split
evaluation or a folder's submission CSV)."""
