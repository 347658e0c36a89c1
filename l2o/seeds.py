"""Every seed offset of the project in one place, so that no two streams ever collide.

A stream's generator is ``l2o.data.seeded_generator(OFFSET, ...)``: the offsets keep the
optimizees and minibatches of meta-training, meta-validation, meta-testing and learning-rate
tuning disjoint, so a reported meta-test never runs on an initialisation that meta-training or
tuning saw.
"""

VAL_INIT = 10_000  # meta-validation optimizees: the same every epoch
TEST_INIT = 20_000  # meta-test optimizees (evaluate.py's reported runs)
TUNE_RUN = 30_000  # learning-rate tuning runs: seeds disjoint from the reported ones
VAL_STREAM = 7_919  # added to the data seed for meta-validation minibatches
