"""Per-peer settings for a collaborative training run.

:class:`CollaborativeSettings` holds everything one peer configures: how to reach the swarm (DHT addresses), how
large a collaborative step is, and how gradients are averaged. Values come from, in decreasing precedence,

1. explicit keyword arguments to :meth:`CollaborativeSettings.resolve`,
2. ``COLLAB_*`` environment variables (every field ``foo`` is settable as ``COLLAB_FOO``),
3. a flat YAML file whose keys are the field names,
4. the defaults declared on the dataclass.

All values are validated in ``__post_init__``, so constructing the dataclass directly is validated too. Every problem
is reported as a :class:`CollaborativeConfigError` whose message names the setting, where the bad value came from
(environment variable or YAML file) and how to fix it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Union, get_args, get_origin, get_type_hints

ENV_PREFIX = "COLLAB_"

# ``COLLAB_*`` environment variables that are not settings and must not be reported as unknown.
# Add names here (e.g. a variable read by a launcher script) instead of weakening the unknown-variable check.
NON_SETTING_ENV_VARS: frozenset[str] = frozenset({"COLLAB_LOGLEVEL"})

TRUE_STRINGS = ("1", "true", "yes", "on")
FALSE_STRINGS = ("0", "false", "no", "off")

# Averaging schemes accepted by the ``algorithm`` setting, with what each averages.
ALGORITHMS: dict[str, str] = {
    "gradient": "average gradients, then every peer takes the same optimizer step (CollaborativeOptimizer)",
    "adaptive": "each peer steps, then parameters and average_opt_statistics are averaged "
    "(CollaborativeAdaptiveOptimizer)",
    "diloco": "every step() is a local inner step; once per target_batch_size the peers average the pseudo-gradient "
    "and take an outer Nesterov SGD step (DiLoCoOptimizer)",
}

# Compression names accepted by the ``compression`` setting, mapped to class names in ``hivemind.compression``.
COMPRESSION_CLASSES: dict[str, str] = {
    "none": "NoCompression",
    "float16": "Float16Compression",
    "scaled-float16": "ScaledFloat16Compression",
    "uniform8bit": "Uniform8BitQuantization",
    "quantile8bit": "Quantile8BitQuantization",
}
# hivemind's BlockwiseQuantization is not offered: it needs bitsandbytes (a GPU library), without which every
# all-reduce that uses it fails.

_RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]+")
_INT_PATTERN = re.compile(r"[+-]?\d+")
_MULTIADDR_EXAMPLE = "/ip4/203.0.113.5/tcp/31337/p2p/12D3KooW..."
_MULTIADDR_FIELD_EXAMPLES = {
    "initial_peers": _MULTIADDR_EXAMPLE,
    "host_maddrs": "/ip4/0.0.0.0/tcp/31337",
    "announce_maddrs": "/ip4/203.0.113.5/tcp/31337",
}


class CollaborativeConfigError(ValueError):
    """Raised for any invalid, unknown or conflicting collaborative setting.

    Attributes:
        setting: The name of the offending setting (or the unknown key / variable), if there is one.
        source: Where the value came from, e.g. ``"environment variable COLLAB_BATCH_SIZE"``, or ``None`` when it
            was passed directly in Python.
    """

    def __init__(self, message: str, *, setting: str | None = None, source: str | None = None) -> None:
        super().__init__(message)
        self.setting = setting
        self.source = source


def _suggestion(name: str, candidates: tuple[str, ...] | list[str]) -> str:
    matches = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return f" Did you mean {matches[0]!r}?" if matches else ""


@dataclass
class CollaborativeSettings:
    """What one peer configures to take part in a collaborative (hivemind) training run.

    Every field can also be set through the environment variable ``COLLAB_<FIELD NAME IN UPPER CASE>`` or a key of
    the same name in a YAML file; see :meth:`resolve` for the precedence.
    """

    run_id: str = field(
        default="collab",
        metadata={
            "help": "Name of the run, used as the DHT key prefix shared by all peers (letters, digits, _ and -)."
        },
    )
    target_batch_size: int = field(
        default=4096,
        metadata={"help": "Total number of samples all peers accumulate together before each optimizer step."},
    )
    batch_size: int | None = field(
        default=None,
        metadata={"help": "Number of samples this peer processes per step() call (None: pass it to step() instead)."},
    )
    initial_peers: list[str] = field(
        default_factory=list,
        metadata={"help": "Multiaddrs (with a /p2p/ peer id) of running peers to join; empty starts a new run."},
    )
    host_maddrs: list[str] = field(
        default_factory=lambda: ["/ip4/0.0.0.0/tcp/0"],
        metadata={"help": "Multiaddrs this peer listens on for DHT and averaging traffic (none in client mode)."},
    )
    announce_maddrs: list[str] = field(
        default_factory=list,
        metadata={"help": "Public multiaddrs announced to other peers, e.g. when behind NAT or port forwarding."},
    )
    client_mode: bool = field(
        default=False,
        metadata={"help": "Run without accepting incoming connections (for peers behind a firewall or NAT)."},
    )
    identity_path: str | None = field(
        default=None,
        metadata={"help": "Path to a private key file that keeps this peer's id stable across restarts."},
    )
    use_ipfs: bool = field(
        default=False,
        metadata={"help": "Use the public IPFS network to find peers (cannot be combined with initial_peers)."},
    )
    averaging_timeout: float = field(
        default=30.0,
        metadata={
            "help": "Seconds after which an unfinished averaging round is abandoned (must exceed a micro-batch's time)."
        },
    )
    matchmaking_time: float = field(
        default=5.0,
        metadata={
            "help": "Seconds a forming averaging group waits for expected peers (it closes at once when all are in)."
        },
    )
    min_refresh_period: float = field(
        default=0.5,
        metadata={"help": "Shortest interval in seconds between fetches of the collaboration progress from the DHT."},
    )
    max_refresh_period: float = field(
        default=30.0,
        metadata={"help": "Longest interval in seconds between fetches of the collaboration progress from the DHT."},
    )
    default_refresh_period: float = field(
        default=3.0,
        metadata={
            "help": "Seconds between progress fetches while no other peer is seen and step() is not being called."
        },
    )
    metadata_expiration: float = field(
        default=60.0,
        metadata={"help": "Seconds after which a peer's published progress expires from the DHT."},
    )
    step_tolerance: int = field(
        default=1,
        metadata={"help": "Steps a peer may lag behind before it downloads the state at its next step() call."},
    )
    reuse_grad_buffers: bool = field(
        default=False,
        metadata={"help": "Accumulate gradients in the model's .grad buffers instead of separate ones to save memory."},
    )
    accumulate_grads_on: str | None = field(
        default=None,
        metadata={"help": "Torch device on which gradients are accumulated, e.g. 'cpu' (None: same as parameters)."},
    )
    algorithm: str = field(
        default="gradient",
        metadata={
            "help": "Averaging scheme: 'gradient' (average gradients, every peer takes the same step), "
            "'adaptive' (each peer steps, then parameters and average_opt_statistics are averaged) or 'diloco' "
            "(local inner steps, an outer step on the averaged pseudo-gradient once per target_batch_size samples)."
        },
    )
    average_opt_statistics: list[str] = field(
        default_factory=list,
        metadata={
            "help": "With algorithm 'adaptive': names of optimizer state entries to average along with the "
            "parameters, e.g. exp_avg_sq."
        },
    )
    outer_lr: float = field(
        default=0.7,
        metadata={"help": "With algorithm 'diloco': learning rate of the outer SGD over the global parameters."},
    )
    outer_momentum: float = field(
        default=0.9,
        metadata={"help": "With algorithm 'diloco': momentum of the outer SGD, in [0, 1)."},
    )
    outer_nesterov: bool = field(
        default=True,
        metadata={
            "help": "With algorithm 'diloco': use Nesterov momentum in the outer SGD (needs outer_momentum > 0)."
        },
    )
    compression: str = field(
        default="none",
        metadata={
            "help": "Compression of averaged tensors (lossy ones leave replicas equal only up to the codec error): "
            + ", ".join(COMPRESSION_CLASSES)
            + "."
        },
    )
    verbose: bool = field(
        default=False,
        metadata={"help": "Log collaboration progress and averaging results at INFO level (default DEBUG)."},
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, _check_type(f.name, getattr(self, f.name)))
        self._validate_values()

    # ------------------------------------------------------------------ validation

    def _validate_values(self) -> None:
        if not _RUN_ID_PATTERN.fullmatch(self.run_id):
            raise CollaborativeConfigError(
                f"run_id: {self.run_id!r} is not a valid run id; use a non-empty name made only of letters, digits, "
                "'_' and '-' (hivemind does not allow '.' in DHT prefixes), e.g. 'my-run_1'.",
                setting="run_id",
            )
        _require_positive("target_batch_size", self.target_batch_size, "e.g. 4096")
        if self.batch_size is not None:
            _require_positive("batch_size", self.batch_size, "or leave it unset to pass the batch size to step()")
        for name in (
            "averaging_timeout",
            "matchmaking_time",
            "min_refresh_period",
            "max_refresh_period",
            "default_refresh_period",
            "metadata_expiration",
        ):
            _require_positive(name, getattr(self, name), f"e.g. {_field_defaults()[name]}")
        if self.min_refresh_period > self.max_refresh_period:
            raise CollaborativeConfigError(
                f"min_refresh_period ({self.min_refresh_period}) is larger than max_refresh_period "
                f"({self.max_refresh_period}); set min_refresh_period <= max_refresh_period.",
                setting="min_refresh_period",
            )
        if self.step_tolerance < 0:
            raise CollaborativeConfigError(
                f"step_tolerance must be >= 0, got {self.step_tolerance}; set it to 0 or a small positive number of "
                "steps, e.g. 1.",
                setting="step_tolerance",
            )
        if self.algorithm not in ALGORITHMS:
            raise CollaborativeConfigError(
                f"algorithm: unknown averaging scheme {self.algorithm!r}; choose one of: {', '.join(ALGORITHMS)}."
                f"{_suggestion(self.algorithm, list(ALGORITHMS))}",
                setting="algorithm",
            )
        self._validate_diloco()
        if self.compression not in COMPRESSION_CLASSES:
            raise CollaborativeConfigError(
                f"compression: unknown compression {self.compression!r}; choose one of: "
                f"{', '.join(COMPRESSION_CLASSES)}.{_suggestion(self.compression, list(COMPRESSION_CLASSES))}",
                setting="compression",
            )
        if self.accumulate_grads_on is not None:
            self._validate_device()
        self._validate_multiaddrs()
        if self.reuse_grad_buffers and self.accumulate_grads_on is not None:
            raise CollaborativeConfigError(
                "reuse_grad_buffers=True conflicts with accumulate_grads_on="
                f"{self.accumulate_grads_on!r}: gradients reused in the model's .grad buffers cannot be accumulated "
                "on another device; drop one of the two settings.",
                setting="reuse_grad_buffers",
            )
        if self.use_ipfs and self.initial_peers:
            raise CollaborativeConfigError(
                "use_ipfs=True conflicts with initial_peers: hivemind finds peers either through IPFS or through "
                "explicit initial peers; drop one of the two settings.",
                setting="use_ipfs",
            )

    def _validate_diloco(self) -> None:
        _require_positive("outer_lr", self.outer_lr, "DiLoCo uses 0.7")
        if not 0 <= self.outer_momentum < 1:
            raise CollaborativeConfigError(
                f"outer_momentum must be in [0, 1), got {self.outer_momentum!r}; set e.g. 0.9 (DiLoCo's value).",
                setting="outer_momentum",
            )
        if self.outer_nesterov and self.outer_momentum == 0:
            raise CollaborativeConfigError(
                "outer_nesterov=True needs outer_momentum > 0; set outer_momentum (e.g. 0.9) or outer_nesterov=false.",
                setting="outer_nesterov",
            )
        if self.algorithm != "diloco":
            return
        if self.reuse_grad_buffers:
            raise CollaborativeConfigError(
                "reuse_grad_buffers=True does not apply to algorithm 'diloco' (every step() takes an inner optimizer "
                "step, nothing is accumulated); set reuse_grad_buffers=false.",
                setting="reuse_grad_buffers",
            )
        if self.accumulate_grads_on is not None:
            raise CollaborativeConfigError(
                "accumulate_grads_on does not apply to algorithm 'diloco' (every step() takes an inner optimizer "
                "step, nothing is accumulated); leave accumulate_grads_on unset.",
                setting="accumulate_grads_on",
            )
        if self.average_opt_statistics:
            raise CollaborativeConfigError(
                "average_opt_statistics is for algorithm 'adaptive'; with algorithm 'diloco' the inner optimizer's "
                "state stays on each peer. Remove average_opt_statistics.",
                setting="average_opt_statistics",
            )

    def outer_kwargs(self) -> dict[str, Any]:
        """The outer optimizer's arguments of :class:`collab_core.DiLoCoOptimizer` (``algorithm: diloco``)."""
        return {"outer_lr": self.outer_lr, "outer_momentum": self.outer_momentum, "nesterov": self.outer_nesterov}

    def _validate_device(self) -> None:
        import torch

        if self.accumulate_grads_on is None:
            return
        try:
            torch.device(self.accumulate_grads_on)
        except (RuntimeError, TypeError, ValueError) as e:
            raise CollaborativeConfigError(
                f"accumulate_grads_on: {self.accumulate_grads_on!r} is not a valid torch device ({e}); use a device "
                "string such as 'cpu', 'cuda' or 'cuda:0', or leave it unset.",
                setting="accumulate_grads_on",
            ) from e

    def _validate_multiaddrs(self) -> None:
        from hivemind.utils.multiaddr import Multiaddr

        for name, example_address in _MULTIADDR_FIELD_EXAMPLES.items():
            for address in getattr(self, name):
                try:
                    parsed = Multiaddr(address)
                except Exception as e:  # the multiaddr parser raises several unrelated exception types
                    raise CollaborativeConfigError(
                        f"{name}: {address!r} is not a valid multiaddr ({e}); expected something like "
                        f"{example_address}",
                        setting=name,
                    ) from e
                protocols = [protocol.name for protocol in parsed.protocols()]
                if name == "initial_peers" and "p2p" not in protocols:
                    raise CollaborativeConfigError(
                        f"initial_peers: {address!r} has no /p2p/<peer id> component; hivemind needs the peer id of "
                        f"every initial peer. Copy the full address printed by that peer, e.g. {_MULTIADDR_EXAMPLE}",
                        setting=name,
                    )
                if name == "announce_maddrs" and any(
                    proto in ("tcp", "udp") and parsed.value_for_protocol(proto) == "0" for proto in protocols
                ):
                    raise CollaborativeConfigError(
                        f"announce_maddrs: {address!r} uses port 0; announced addresses need the explicit port other "
                        "peers should connect to, e.g. /ip4/203.0.113.5/tcp/31337.",
                        setting=name,
                    )

    # ------------------------------------------------------------------ loading

    @classmethod
    def resolve(
        cls,
        yaml_path: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        **explicit: Any,
    ) -> CollaborativeSettings:
        """Build settings from explicit arguments, environment variables, a YAML file and defaults.

        Precedence is explicit arguments > ``COLLAB_*`` environment variables > YAML file > dataclass defaults.

        Args:
            yaml_path: Optional path to a flat YAML mapping of setting names to values.
            env: Environment to read ``COLLAB_*`` variables from; defaults to ``os.environ``.
            **explicit: Settings given directly. A value of ``None`` means "not given" and falls through to the
                lower-precedence sources, so an Optional setting cannot be forced back to ``None`` this way while an
                environment variable or the YAML file sets it (unset it there instead).

        Returns:
            The validated settings.

        Raises:
            CollaborativeConfigError: For unknown names, unparsable or invalid values, or conflicting settings. The
                message names the setting and the variable or file the value came from.
        """
        values: dict[str, Any] = {}
        sources: dict[str, str] = {}
        if yaml_path is not None:
            for name, value in _read_yaml(yaml_path).items():
                values[name] = value
                sources[name] = f"YAML file {os.fspath(yaml_path)}"
        given = {name for name, value in explicit.items() if value is not None}
        for name, value in _read_env(os.environ if env is None else env, skip=given).items():
            values[name] = value
            sources[name] = f"environment variable {env_var(name)}"
        names = field_names()
        for name, value in explicit.items():
            if name not in names:
                raise CollaborativeConfigError(
                    f"Unknown setting {name!r}; valid settings are: {', '.join(names)}.{_suggestion(name, names)}",
                    setting=name,
                )
            if value is not None:
                values[name] = value
                sources.pop(name, None)
        try:
            return cls(**values)
        except CollaborativeConfigError as e:
            source = sources.get(e.setting) if e.setting is not None else None
            if source is None:
                raise
            raise CollaborativeConfigError(f"{e} [set by {source}]", setting=e.setting, source=source) from None

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> CollaborativeSettings:
        """Load settings from a YAML file, with ``COLLAB_*`` environment variables taking precedence.

        Args:
            path: Path to a flat YAML mapping of setting names to values.
            env: Environment to read ``COLLAB_*`` variables from; defaults to ``os.environ``.

        Returns:
            The validated settings.
        """
        return cls.resolve(yaml_path=path, env=env)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> CollaborativeSettings:
        """Load settings from ``COLLAB_*`` environment variables on top of the defaults.

        Args:
            env: Environment to read; defaults to ``os.environ``.

        Returns:
            The validated settings.
        """
        return cls.resolve(env=env)

    # ------------------------------------------------------------------ export

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as a plain dict (lists are copied)."""
        return {f.name: _copy_value(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def make_compression(self) -> Any:
        """Instantiate the ``hivemind.compression`` codec selected by the ``compression`` setting."""
        import hivemind.compression

        return getattr(hivemind.compression, COMPRESSION_CLASSES[self.compression])()

    def optimizer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``CollaborativeOptimizer(opt, dht=..., **kwargs)``.

        ``algorithm`` and ``average_opt_statistics`` are not included: they choose the optimizer class (see
        :func:`collab_core.join.make_collaborative_optimizer`); nor are the ``outer_*`` settings
        (:meth:`outer_kwargs`, for ``algorithm: diloco``).
        """
        import torch

        return {
            "prefix": self.run_id,
            "target_batch_size": self.target_batch_size,
            "batch_size_per_step": self.batch_size,
            "min_refresh_period": self.min_refresh_period,
            "max_refresh_period": self.max_refresh_period,
            "default_refresh_period": self.default_refresh_period,
            "metadata_expiration": self.metadata_expiration,
            "averaging_timeout": self.averaging_timeout,
            "step_tolerance": self.step_tolerance,
            "reuse_grad_buffers": self.reuse_grad_buffers,
            "accumulate_grads_on": None if self.accumulate_grads_on is None else torch.device(self.accumulate_grads_on),
            "client_mode": self.client_mode,
            "verbose": self.verbose,
            "matchmaking_time": self.matchmaking_time,
            "compression": self.make_compression(),
        }


# ---------------------------------------------------------------------- field introspection


@dataclass(frozen=True)
class _Kind:
    base: type  # one of str, int, float, bool, list (a list always holds str)
    optional: bool

    def describe(self) -> str:
        text = "list[str]" if self.base is list else self.base.__name__
        return f"{text} | None" if self.optional else text


def _kind_from_hint(hint: Any) -> _Kind:
    optional = False
    if get_origin(hint) in (Union, types.UnionType):
        args = [arg for arg in get_args(hint) if arg is not type(None)]
        optional = len(args) < len(get_args(hint))
        (hint,) = args
    base = list if get_origin(hint) is list else hint
    if base not in (str, int, float, bool, list):
        raise TypeError(f"unsupported setting type {hint!r}")
    return _Kind(base, optional)


_KINDS: dict[str, _Kind] = {name: _kind_from_hint(hint) for name, hint in get_type_hints(CollaborativeSettings).items()}


def field_names() -> tuple[str, ...]:
    """Return the names of all settings, in declaration order."""
    return tuple(f.name for f in dataclasses.fields(CollaborativeSettings))


def env_var(name: str) -> str:
    """Return the environment variable that sets ``name``, e.g. ``env_var("run_id") == "COLLAB_RUN_ID"``.

    Raises:
        CollaborativeConfigError: If ``name`` is not a setting.
    """
    if name not in _KINDS:
        names = field_names()
        raise CollaborativeConfigError(
            f"Unknown setting {name!r}; valid settings are: {', '.join(names)}.{_suggestion(name, names)}",
            setting=name,
        )
    return ENV_PREFIX + name.upper()


def _field_defaults() -> dict[str, Any]:
    defaults = {}
    for f in dataclasses.fields(CollaborativeSettings):
        defaults[f.name] = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return defaults


def describe_settings() -> list[dict[str, Any]]:
    """Describe every setting, e.g. to render a README table.

    Returns:
        One dict per setting with keys ``name``, ``type`` (readable string such as ``"int | None"``), ``default``,
        ``env_var`` and ``help``.
    """
    defaults = _field_defaults()
    return [
        {
            "name": f.name,
            "type": _KINDS[f.name].describe(),
            "default": defaults[f.name],
            "env_var": env_var(f.name),
            "help": f.metadata["help"],
        }
        for f in dataclasses.fields(CollaborativeSettings)
    ]


def settings_table_markdown() -> str:
    """The settings as a Markdown table (name, type, default, environment variable, meaning), as in the README."""
    lines = ["| setting | type | default | environment variable | meaning |", "| --- | --- | --- | --- | --- |"]
    for row in describe_settings():
        kind = row["type"].replace("|", "\\|")  # a bare "|" would end the table cell
        lines.append(f"| `{row['name']}` | `{kind}` | `{row['default']!r}` | `{row['env_var']}` | {row['help']} |")
    return "\n".join(lines)


# Example values for error messages, where the default does not make a good example.
_EXAMPLES: dict[str, Any] = {
    "batch_size": 32,
    "initial_peers": [_MULTIADDR_EXAMPLE],
    "announce_maddrs": ["/ip4/203.0.113.5/tcp/31337"],
    "identity_path": "./peer_identity.key",
    "accumulate_grads_on": "cpu",
    "average_opt_statistics": ["exp_avg_sq"],
}


def _example(name: str) -> Any:
    return _EXAMPLES.get(name, _field_defaults()[name])


def _copy_value(value: Any) -> Any:
    return list(value) if isinstance(value, list) else value


# ---------------------------------------------------------------------- type checking and parsing

_EXPECTED = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "a boolean (true or false)",
    list: "a list of strings (or a single string)",
}


def _check_type(name: str, value: Any) -> Any:
    """Check that ``value`` has the declared type of setting ``name``; return it normalised."""
    kind = _KINDS[name]
    if value is None and kind.optional:
        return None
    ok = False
    if kind.base is bool:
        ok = isinstance(value, bool)
    elif kind.base is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind.base is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            value = float(value)
    elif kind.base is str:
        ok = isinstance(value, str)
    elif kind.base is list:
        if isinstance(value, str):
            value = [value]
        ok = isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value)
        if ok:
            value = list(value)
    if not ok:
        expected = _EXPECTED[kind.base] + (" or None" if kind.optional else "")
        raise CollaborativeConfigError(
            f"{name} must be {expected}, got {type(value).__name__} {value!r}; set it to a value of that type, "
            f"e.g. {_example(name)!r}.",
            setting=name,
        )
    return value


def _require_positive(name: str, value: float, hint: str) -> None:
    if not (value > 0 and math.isfinite(value)):
        expected = "an integer > 0" if isinstance(value, int) else "a finite number > 0"
        raise CollaborativeConfigError(
            f"{name} must be {expected}, got {value!r}; set a positive value ({hint}).", setting=name
        )


def _parse_env_value(name: str, variable: str, raw: str) -> Any:
    kind = _KINDS[name]
    text = raw.strip()
    if kind.optional and text.lower() in ("", "none"):
        return None
    if kind.base is list:
        return [item for item in re.split(r"[,\s]+", text) if item]
    if kind.base is str:
        return text
    if kind.base is bool:
        if text.lower() in TRUE_STRINGS:
            return True
        if text.lower() in FALSE_STRINGS:
            return False
        raise CollaborativeConfigError(
            f"{variable}={raw!r} is not a valid boolean for setting {name}; accepted values (case-insensitive) are "
            f"{', '.join(TRUE_STRINGS)} for true and {', '.join(FALSE_STRINGS)} for false.",
            setting=name,
            source=f"environment variable {variable}",
        )
    try:
        if kind.base is int:
            if not _INT_PATTERN.fullmatch(text):
                raise ValueError(text)
            return int(text)
        return float(text)
    except ValueError:
        expected = "an integer" if kind.base is int else "a number"
        raise CollaborativeConfigError(
            f"{variable}={raw!r} is not {expected} (setting {name} has type {kind.describe()}); set it to "
            f"{expected}, e.g. {variable}={_example(name)!r}"
            + (" or to 'none' to leave it unset." if kind.optional else "."),
            setting=name,
            source=f"environment variable {variable}",
        ) from None


def _read_env(env: Mapping[str, str], skip: set[str] | frozenset[str] = frozenset()) -> dict[str, Any]:
    """Parse the ``COLLAB_*`` variables of ``env`` into raw (not yet validated) setting values.

    Variables of settings named in ``skip`` (given explicitly) are not parsed; unknown variables are still errors.
    """
    by_variable = {env_var(name): name for name in field_names()}
    values: dict[str, Any] = {}
    for variable in sorted(env):
        if not variable.startswith(ENV_PREFIX) or variable in NON_SETTING_ENV_VARS:
            continue
        name = by_variable.get(variable)
        if name is None:
            valid = sorted(by_variable)
            raise CollaborativeConfigError(
                f"Unknown environment variable {variable}: it is not a collaborative setting. Valid variables are: "
                f"{', '.join(valid)}.{_suggestion(variable, valid)} Rename or unset it.",
                setting=variable,
                source=f"environment variable {variable}",
            )
        if name not in skip:
            values[name] = _parse_env_value(name, variable, env[variable])
    return values


def _read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a flat YAML mapping of setting names to raw (not yet validated) values."""
    import yaml

    location = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as file:
            data = yaml.safe_load(file)
    except OSError as e:
        raise CollaborativeConfigError(
            f"Cannot read settings file {location}: {e}; check the path.", source=f"YAML file {location}"
        ) from e
    except yaml.YAMLError as e:
        raise CollaborativeConfigError(
            f"Settings file {location} is not valid YAML: {e}", source=f"YAML file {location}"
        ) from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CollaborativeConfigError(
            f"Settings file {location} must contain a mapping of setting names to values at the top level, got "
            f"{type(data).__name__}; write it as e.g. 'target_batch_size: 4096'.",
            source=f"YAML file {location}",
        )
    names = field_names()
    for key in data:
        if not isinstance(key, str) or key not in names:
            raise CollaborativeConfigError(
                f"Unknown key {key!r} in settings file {location}; valid keys are: {', '.join(names)}."
                f"{_suggestion(str(key), names)}",
                setting=str(key),
                source=f"YAML file {location}",
            )
    return dict(data)
