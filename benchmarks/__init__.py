"""The README's benchmarks; run them with ``make bench`` (``python -m benchmarks.run``).

One module per benchmark: ``federated`` (9a, 9b: a real embedded alliance on full MNIST against
a centralized epoch), ``aggregation`` (9c: FedAvg memory and time against the number of
updates), ``engine_scale`` (9d: the coordinator with 1,000 simulated members). ``run`` is the
command line; ``common`` holds what they share.
"""
