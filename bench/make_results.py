"""Regenerate docs/results.md and the README's results block from the run folders (s2d.experiments.results).

Usage: python bench/make_results.py [--runs runs] [--out docs/results.md] [--only SECTION ...]
"""

from s2d.experiments.results import main

if __name__ == "__main__":
    main()
