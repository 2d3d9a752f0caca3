"""The schema of a run's settings: types and ranges of every key of ``config.json`` and of a checkpoint's metadata.

A run folder may be edited by hand or crafted; before any value reaches torch (where a wrong type gives messages
such as ``manual_seed expected a long, but got str``) it is checked here, and the error names the file, the key
and the expected type or range, e.g. ``config.json: key 'train.seed' must be an integer, got str 'a'``.

The schema is a table :data:`TRAIN_SCHEMA` / :data:`DATA_SCHEMA` of :class:`Key` entries; :func:`check_section`
applies one table to one dict. :class:`scoredensity.train.TrainConfig` uses the same table for its own checks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .errors import InputFileError

__all__ = [
    "ConfigError",
    "Key",
    "MAX_STEPS",
    "TRAIN_SCHEMA",
    "DATA_SCHEMA",
    "NET_SCHEMA",
    "check_value",
    "check_section",
    "check_run_config",
    "check_step",
]

MAX_STEPS = 10**9
"""Largest number of optimiser steps a run may ask for (a billion steps is far beyond any real run; a crafted
``step: 1e12`` is refused instead of "training" for ever)."""

MAX_SEED = 2**63 - 1


class ConfigError(InputFileError):
    """A run configuration or checkpoint value of the wrong type or out of range; names the file and key (exit
    code 3; a ``ValueError``)."""


@dataclass(frozen=True)
class Key:
    """One setting: its type and allowed values.

    Attributes:
        kind: ``"int"``, ``"float"`` (ints accepted), ``"bool"``, ``"str"``, ``"betas"`` (two floats in [0, 1)),
            ``"int_list"`` (non-empty list of positive ints), ``"dict"``.
        lo, hi: inclusive bounds for numbers (None: unbounded). lo_open: ``lo`` itself is excluded.
        choices: allowed strings. optional: ``None`` is allowed.
    """

    kind: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple[str, ...] | None = None
    optional: bool = False


_EXPECTED = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "str": "a string",
    "betas": "a list of two numbers in [0, 1)",
    "int_list": "a non-empty list of positive integers",
    "dict": "an object",
}


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{type(value).__name__} {text}"


def check_value(where: str, key: str, value: Any, spec: Key) -> Any:
    """Check one value against ``spec``; returns it (ints given for floats become floats).

    Raises:
        ConfigError: ``"{where}: key '{key}' must be <expected>, got <type> <value>"``.
    """
    if value is None:
        if spec.optional:
            return None
        raise ConfigError(f"{where}: key {key!r} must be {_EXPECTED[spec.kind]}, got null")
    bad = ConfigError(f"{where}: key {key!r} must be {_EXPECTED[spec.kind]}, got {_describe(value)}")
    if spec.kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
    elif spec.kind == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{where}: key {key!r} must be a finite number, got {value}")
    elif spec.kind == "bool":
        if not isinstance(value, bool):
            raise bad
    elif spec.kind == "str":
        if not isinstance(value, str):
            raise bad
        if spec.choices is not None and value not in spec.choices:
            raise ConfigError(f"{where}: key {key!r} must be one of {list(spec.choices)}, got {value!r}")
    elif spec.kind == "betas":
        ok = isinstance(value, list | tuple) and len(value) == 2
        ok = ok and all(not isinstance(b, bool) and isinstance(b, int | float) and 0 <= b < 1 for b in value)
        if not ok:
            raise bad
        return [float(b) for b in value]
    elif spec.kind == "int_list":
        ok = isinstance(value, list | tuple) and len(value) > 0
        ok = ok and all(not isinstance(c, bool) and isinstance(c, int) and c >= 1 for c in value)
        if not ok:
            raise bad
        return list(value)
    elif spec.kind == "dict":
        if not isinstance(value, dict):
            raise bad
    if spec.kind in ("int", "float"):
        if spec.lo is not None and (value < spec.lo or (spec.lo_open and value == spec.lo)):
            raise ConfigError(f"{where}: key {key!r} must be {'>' if spec.lo_open else '>='} {spec.lo}, got {value}")
        if spec.hi is not None and (value > spec.hi or (spec.hi_open and value == spec.hi)):
            raise ConfigError(f"{where}: key {key!r} must be {'<' if spec.hi_open else '<='} {spec.hi}, got {value}")
    return value


def check_section(
    where: str, section: str, values: Any, schema: dict[str, Key], *, allow_unknown: bool = False
) -> dict[str, Any]:
    """Check the dict ``values`` (key ``section`` of the file ``where``) against ``schema``.

    Keys missing from ``values`` are not an error (the caller's defaults apply); unknown keys are, unless
    ``allow_unknown``. Returns the checked dict.

    Raises:
        ConfigError: naming the file, ``section.key`` and what was expected.
    """
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: key {section!r} must be an object, got {_describe(values)}")
    unknown = sorted(set(values) - set(schema))
    if unknown and not allow_unknown:
        raise ConfigError(f"{where}: unknown keys {[f'{section}.{k}' for k in unknown]} (known: {sorted(schema)})")
    out = dict(values)
    for k, spec in schema.items():
        if k in values:
            out[k] = check_value(where, f"{section}.{k}", values[k], spec)
    return out


TRAIN_SCHEMA: dict[str, Key] = {
    "steps": Key("int", 1, MAX_STEPS),
    "batch_size": Key("int", 1, 2**31 - 1),
    "lr": Key("float", 0, None, lo_open=True),
    "warmup": Key("int", 0, MAX_STEPS),
    "lr_decay": Key("str", choices=("cosine", "constant")),
    "min_lr_frac": Key("float", 0, 1),
    "weight_decay": Key("float", 0),
    "betas": Key("betas"),
    "grad_clip": Key("float", 0),
    "ema_decay": Key("float", 0, 1, hi_open=True),
    "weighting": Key("str", choices=("elbo", "simple")),
    "lam_sampling": Key("str", choices=("adaptive", "uniform", "t_uniform", "ddpm")),
    "lam_min": Key("float"),
    "lam_max": Key("float"),
    "low_discrepancy": Key("bool"),
    "conditional": Key("bool"),
    "label_dropout": Key("float", 0, 1),
    "seed": Key("int", 0, MAX_SEED),
    "eval_every": Key("int", 0, MAX_STEPS),
    "eval_n": Key("int", 0),
    "eval_n_t": Key("int", 1, 2**20),
    "eval_n_z": Key("int", 1, 2**20),
    "eval_final": Key("bool"),
    "checkpoint_every": Key("int", 1, MAX_STEPS),
    "log_every": Key("int", 1, MAX_STEPS),
    "threads": Key("int", 0, 4096),
    "device": Key("str"),
    "precision": Key("str", choices=("fp32", "bf16", "fp16")),
}
"""Every :class:`scoredensity.train.TrainConfig` field."""

DATA_SCHEMA: dict[str, Key] = {
    "name": Key("str"),
    "seed": Key("int", 0, MAX_SEED),
    "test_fraction": Key("float", 0, 1, lo_open=True, hi_open=True),
    "n": Key("int", 2, None, optional=True),
    "logit": Key("bool"),
    "root": Key("str", optional=True),
    "levels": Key("int", 2, None, optional=True),
}
"""The arguments of :func:`scoredensity.data.load_dataset` a run stores."""

NET_SCHEMA: dict[str, Key] = {
    "type": Key("str", choices=("mlp", "unet")),
    "shape": Key("int_list"),
    "data_std": Key("float", 0, None, lo_open=True),
    "num_classes": Key("int", 0, 2**20),
    "hidden": Key("int", 1, 2**16),
    "blocks": Key("int", 0, 1024),
    "emb_dim": Key("int", 1, 2**16),
    "channels": Key("int_list"),
    "layers_per_block": Key("int", 1, 64),
    "param": Key("str", choices=("v", "eps")),
}
"""The network keys checked here (other keys go to the network's constructor, which checks them)."""


def check_run_config(where: str, cfg: Any) -> dict[str, Any]:
    """Check a whole run configuration (``config.json``, or a checkpoint's metadata): sections ``data``, ``net``,
    ``train``, and the optional ``version`` and ``data_fingerprint``.

    Raises:
        ConfigError: the first bad key, with the file, the key and the expected type or range.
    """
    if not isinstance(cfg, dict):
        raise ConfigError(f"{where}: must hold a JSON object, got {_describe(cfg)}")
    missing = [k for k in ("data", "net", "train") if k not in cfg]
    if missing:
        raise ConfigError(f"{where}: is not a scoredensity run configuration (missing keys {missing})")
    out = dict(cfg)
    out["data"] = check_section(where, "data", cfg["data"], DATA_SCHEMA)
    if "name" not in out["data"]:
        raise ConfigError(f"{where}: key 'data.name' is missing")
    out["net"] = check_section(where, "net", cfg["net"], NET_SCHEMA, allow_unknown=True)
    out["train"] = check_section(where, "train", cfg["train"], TRAIN_SCHEMA)
    tr = out["train"]
    if "lam_min" in tr and "lam_max" in tr and not tr["lam_max"] > tr["lam_min"]:
        raise ConfigError(
            f"{where}: keys 'train.lam_min' < 'train.lam_max' required, got [{tr['lam_min']}, {tr['lam_max']}]"
        )
    if "version" in cfg:
        check_value(where, "version", cfg["version"], Key("int", 1, 1000))
    if "data_fingerprint" in cfg:
        check_value(where, "data_fingerprint", cfg["data_fingerprint"], Key("str", optional=True))
    return out


def check_step(where: str, step: Any, total: int | None = None) -> int:
    """A checkpoint's ``step``: an integer in ``[0, total]`` (``total``: the run's steps, else :data:`MAX_STEPS`).

    Raises:
        ConfigError: naming the file and the value.
    """
    check_value(where, "step", step, Key("int", 0, MAX_STEPS))
    if total is not None and step > total:
        raise ConfigError(f"{where}: key 'step' = {step} exceeds the run's {total} steps")
    return int(step)
