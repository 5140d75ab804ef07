"""Bad settings and the error each must give: rows of the bad-configuration table (reliability scenario 11).

Each row names the offending setting and fragments of the message (the fix); ``tests/unit/test_settings.py`` turns
every row into a test, ``tests/reliability/test_bad_input.py`` checks the table covers every kind of mistake.
"""

from __future__ import annotations

from typing import Any

PEER_ID = "12D3KooWJn8oEDFYFePrekUS6sxn2xTph2ViHFoyiSCy9C1n19Nj"
PEER_A = f"/ip4/203.0.113.5/tcp/31337/p2p/{PEER_ID}"
PEER_B = f"/ip4/127.0.0.1/tcp/4242/p2p/{PEER_ID}"


BAD_PYTHON_VALUES: list[tuple[dict[str, Any], str, tuple[str, ...]]] = [
    ({"target_batch_size": "4"}, "target_batch_size", ("target_batch_size must be an integer", "str '4'")),
    ({"target_batch_size": True}, "target_batch_size", ("an integer", "bool True")),
    ({"target_batch_size": 4.0}, "target_batch_size", ("an integer", "float 4.0")),
    ({"target_batch_size": 0}, "target_batch_size", ("target_batch_size", "> 0", "got 0")),
    ({"batch_size": -1}, "batch_size", ("batch_size", "> 0", "leave it unset")),
    ({"batch_size": "8"}, "batch_size", ("batch_size must be an integer or None",)),
    ({"averaging_timeout": float("inf")}, "averaging_timeout", ("averaging_timeout", "finite number > 0", "inf")),
    ({"averaging_timeout": "30"}, "averaging_timeout", ("averaging_timeout must be a number",)),
    ({"matchmaking_time": 0}, "matchmaking_time", ("matchmaking_time", "> 0", "e.g. 5.0")),
    ({"metadata_expiration": -1.0}, "metadata_expiration", ("metadata_expiration", "> 0")),
    ({"default_refresh_period": float("nan")}, "default_refresh_period", ("default_refresh_period", "finite")),
    (
        {"min_refresh_period": 5.0, "max_refresh_period": 1.0},
        "min_refresh_period",
        ("min_refresh_period (5.0)", "max_refresh_period (1.0)", "min_refresh_period <= max_refresh_period"),
    ),
    ({"step_tolerance": -1}, "step_tolerance", ("step_tolerance must be >= 0", "got -1")),
    ({"verbose": 1}, "verbose", ("verbose must be a boolean", "int 1")),
    ({"client_mode": "false"}, "client_mode", ("client_mode must be a boolean",)),
    ({"initial_peers": [PEER_A, 7]}, "initial_peers", ("initial_peers must be a list of strings",)),
    ({"host_maddrs": 42}, "host_maddrs", ("host_maddrs must be a list of strings",)),
    ({"run_id": "my.run"}, "run_id", ("run_id", "'my.run'", "letters, digits, '_' and '-'", "'.'")),
    ({"run_id": ""}, "run_id", ("run_id", "non-empty")),
    ({"run_id": 5}, "run_id", ("run_id must be a string",)),
    (
        {"compression": "fp16"},
        "compression",
        ("compression", "'fp16'", "none, float16, scaled-float16, uniform8bit, quantile8bit"),
    ),
    ({"compression": "float-16"}, "compression", ("Did you mean 'float16'?",)),
    ({"algorithm": "gradients"}, "algorithm", ("algorithm", "'gradients'", "gradient, adaptive", "'gradient'?")),
    ({"algorithm": "dilcoo"}, "algorithm", ("algorithm", "'dilcoo'", "gradient, adaptive, diloco", "'diloco'?")),
    ({"outer_lr": 0}, "outer_lr", ("outer_lr", "> 0", "got 0", "DiLoCo uses 0.7")),
    ({"outer_lr": -0.7}, "outer_lr", ("outer_lr", "> 0")),
    ({"outer_momentum": 1.0}, "outer_momentum", ("outer_momentum must be in [0, 1)", "e.g. 0.9")),
    (
        {"outer_momentum": 0.0, "outer_nesterov": True},
        "outer_nesterov",
        ("outer_nesterov=True needs outer_momentum > 0", "outer_nesterov=false"),
    ),
    (
        {"algorithm": "diloco", "reuse_grad_buffers": True},
        "reuse_grad_buffers",
        ("reuse_grad_buffers=True does not apply to algorithm 'diloco'", "set reuse_grad_buffers=false"),
    ),
    (
        {"algorithm": "diloco", "average_opt_statistics": ["exp_avg_sq"]},
        "average_opt_statistics",
        ("average_opt_statistics is for algorithm 'adaptive'", "Remove average_opt_statistics"),
    ),
    ({"accumulate_grads_on": "gpu7"}, "accumulate_grads_on", ("accumulate_grads_on", "'gpu7'", "'cpu'")),
    (
        {"initial_peers": ["/ip4/1.2.3/tcp/x"]},
        "initial_peers",
        ("initial_peers: '/ip4/1.2.3/tcp/x' is not a valid multiaddr", "expected something like /ip4/203.0.113.5"),
    ),
    (
        {"host_maddrs": ["localhost:1234"]},
        "host_maddrs",
        ("host_maddrs: 'localhost:1234' is not a valid multiaddr", "like /ip4/0.0.0.0/tcp/31337"),
    ),
    (
        {"announce_maddrs": ["/ip4/1.2.3.4/tcp/nope"]},
        "announce_maddrs",
        ("announce_maddrs: '/ip4/1.2.3.4/tcp/nope' is not a valid multiaddr",),
    ),
    (
        {"initial_peers": ["/ip4/203.0.113.5/tcp/31337"]},
        "initial_peers",
        ("initial_peers: '/ip4/203.0.113.5/tcp/31337'", "/p2p/<peer id>", "full address"),
    ),
    ({"announce_maddrs": ["/ip4/203.0.113.5/tcp/0"]}, "announce_maddrs", ("announce_maddrs", "port 0", "explicit")),
    (
        {"reuse_grad_buffers": True, "accumulate_grads_on": "cpu"},
        "reuse_grad_buffers",
        ("reuse_grad_buffers", "accumulate_grads_on", "drop one"),
    ),
    ({"use_ipfs": True, "initial_peers": [PEER_A]}, "use_ipfs", ("use_ipfs", "initial_peers", "drop one")),
]


BAD_ENV_VALUES: list[tuple[dict[str, str], str, tuple[str, ...]]] = [
    (
        {"COLLAB_VERBOSE": "maybe"},
        "verbose",
        ("COLLAB_VERBOSE='maybe'", "verbose", "1, true, yes, on", "0, false, no, off"),
    ),
    ({"COLLAB_CLIENT_MODE": ""}, "client_mode", ("COLLAB_CLIENT_MODE=''", "accepted values")),
    (
        {"COLLAB_TARGET_BATCH_SIZE": "4.0"},
        "target_batch_size",
        ("COLLAB_TARGET_BATCH_SIZE='4.0'", "an integer", "target_batch_size", "COLLAB_TARGET_BATCH_SIZE=4096"),
    ),
    ({"COLLAB_STEP_TOLERANCE": "one"}, "step_tolerance", ("COLLAB_STEP_TOLERANCE='one'", "an integer")),
    (
        {"COLLAB_BATCH_SIZE": "lots"},
        "batch_size",
        ("COLLAB_BATCH_SIZE='lots'", "int | None", "COLLAB_BATCH_SIZE=32", "'none'"),
    ),
    ({"COLLAB_AVERAGING_TIMEOUT": "30s"}, "averaging_timeout", ("COLLAB_AVERAGING_TIMEOUT='30s'", "a number")),
    (
        {"COLLAB_TARGET_BATCH_SIZE": "0"},
        "target_batch_size",
        ("target_batch_size must be an integer > 0", "[set by environment variable COLLAB_TARGET_BATCH_SIZE]"),
    ),
    (
        {"COLLAB_INITIAL_PEERS": f"{PEER_A} /ip4/1.2.3/tcp/x"},
        "initial_peers",
        ("'/ip4/1.2.3/tcp/x' is not a valid multiaddr", "environment variable COLLAB_INITIAL_PEERS"),
    ),
    (
        {"COLLAB_BATCH_SZE": "3"},
        "COLLAB_BATCH_SZE",
        ("Unknown environment variable COLLAB_BATCH_SZE", "Did you mean 'COLLAB_BATCH_SIZE'?", "COLLAB_RUN_ID"),
    ),
    ({"COLLAB_COMPRESSION": "int8"}, "compression", ("'int8'", "quantile8bit", "COLLAB_COMPRESSION")),
    (
        {"COLLAB_REUSE_GRAD_BUFFERS": "1", "COLLAB_ACCUMULATE_GRADS_ON": "cpu"},
        "reuse_grad_buffers",
        ("reuse_grad_buffers", "accumulate_grads_on", "drop one", "COLLAB_REUSE_GRAD_BUFFERS"),
    ),
    ({"COLLAB_RUN_ID": "a.b"}, "run_id", ("run_id", "'a.b'", "COLLAB_RUN_ID")),
]


BAD_YAML_VALUES: list[tuple[str, str | None, tuple[str, ...]]] = [
    ('target_batch_size: "4096"\n', "target_batch_size", ("target_batch_size must be an integer", "str '4096'")),
    ("target_batch_size: 4096.0\n", "target_batch_size", ("target_batch_size must be an integer", "float")),
    ("verbose: 1\n", "verbose", ("verbose must be a boolean", "int 1")),
    ("averaging_timeout: soon\n", "averaging_timeout", ("averaging_timeout must be a number", "'soon'")),
    ("initial_peers: {a: b}\n", "initial_peers", ("initial_peers must be a list of strings", "dict")),
    ("host_maddrs: 5\n", "host_maddrs", ("host_maddrs must be a list of strings",)),
    ("batch_size: 0\n", "batch_size", ("batch_size must be an integer > 0",)),
    (
        "target_bach_size: 5\n",
        "target_bach_size",
        ("Unknown key 'target_bach_size'", "Did you mean 'target_batch_size'?", "valid keys are"),
    ),
    ("collaborative:\n  run_id: x\n", "collaborative", ("Unknown key 'collaborative'", "valid keys are")),
    ("- run_id\n- collab\n", None, ("must contain a mapping", "list")),
    ("run_id: [unclosed\n", None, ("is not valid YAML",)),
    ("initial_peers:\n  - /ip4/203.0.113.5/tcp/31337\n", "initial_peers", ("/p2p/<peer id>",)),
]
