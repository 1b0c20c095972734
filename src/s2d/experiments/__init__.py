"""The bench experiments' "read the results" half, and the results document built from it.

Each experiment has two halves. Running its arms (subprocesses of the `s2d` CLI writing run folders under runs/)
is bench/<experiment>.py; reading what those folders hold (tables, readings, figures) is a module here:
`smollm2` (bench/exp_smollm2_s2d.py), `vit` (bench/exp_vit.py), `minilm` (bench/exp_minilm_polarity.py) and
`lowrank_grid` (bench/lowrank_grid.py). `results` writes docs/results.md and the README's results block from
them (bench/make_results.py runs it), and `record` reads what a run folder recorded: every setting the text
states comes from a run's config.yaml or metrics.json, never from the text itself.

This is the top layer: it imports s2d's library modules, and no other s2d module imports it.
"""
