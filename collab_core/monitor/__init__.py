"""``collab monitor`` / ``collab status``: watching a collaboration from a non-training DHT peer.

One module per job: :mod:`~collab_core.monitor.swarm` (pure: records -> the swarm's state),
:mod:`~collab_core.monitor.history` (time series for the charts), :mod:`~collab_core.monitor.prometheus` (pure:
state -> Prometheus text), :mod:`~collab_core.monitor.reader` (the DHT side), :mod:`~collab_core.monitor.server`
(the aiohttp web server and the dashboard page), :mod:`~collab_core.monitor.backup` (swarm backups),
:mod:`~collab_core.monitor.table` (the text table of ``collab status``).
"""
