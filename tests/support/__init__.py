"""Helpers shared by the tests (and the benchmarks in ``bench/``), one module per job.

- ``processes``: launching peer processes, ending their process groups, a bootstrap DHT, ``COLLAB_*`` environments.
- ``barrier``: the start/finish barrier over the DHT used by the test peers and the benchmark peers.
- ``round_contributions``: which recorded micro-batches each collaborative step averaged (for replays).
- ``core_runs``: running core peers to completion and comparing their tensors.
- ``reliability``: reliability peers' arguments, replica comparisons, process-group checks.
- ``accelerate_inprocess``, ``accelerate_launching``, ``accelerate_replay``: in-process Accelerate peers,
  ``accelerate launch`` peers and single-process replays of their runs.
- ``bad_settings``: the bad-configuration table (settings and the error each must give).
- ``console_output``: reading a peer's console as a person would (our log lines, ETAs, join hints, bar frames).
"""
