"""Block-grained scaling (LegoDNN, ../shared/REFERENCE.md section 4): a model's single-entry single-exit blocks,
their pruned descendants, and one descendant per block chosen at run time within latency and memory budgets.

- ``fxeff.passes.Blocks`` (fxeff/passes/blocks.py): finds the blocks on the normalised graph view and reports them.
- ``fxeff.blocks.descendants``: structured filter pruning of a block's internal convs with torch-pruning (DepGraph).
- ``fxeff.blocks.select``: the exact in-process optimiser (one descendant per block, two budgets, switching cost).
"""
