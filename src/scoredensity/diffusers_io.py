"""Local diffusers folders in and out: load a pipeline or model folder as a canonical ``EpsFn``, and export a
canonical-time U-Net denoiser as a folder that diffusers' ``DDPMPipeline`` loads and samples.

Loading never downloads: the path must be a local folder, and everything is read with
``local_files_only=True``. Two layouts are understood:

* a pipeline folder (``save_pretrained`` of a pipeline): ``model_index.json``, ``unet/config.json`` with
  ``unet/diffusion_pytorch_model.safetensors`` (or ``.bin``), and ``scheduler/scheduler_config.json``;
* a bare model folder (``save_pretrained`` of a ``UNet2DModel``): ``config.json`` and the weights, with the
  scheduler's ``scheduler_config.json`` next to them, or in ``../scheduler/`` or ``./scheduler/``.

Export (:func:`save_diffusers`) writes a pipeline folder (``DDPMPipeline.save_pretrained``) from

* a :class:`~scoredensity.adapters.DiffusersEps` (its U-Net and scheduler config, unchanged), or
* a canonical-time :class:`scoredensity.nets.UNetDenoiser`: its ``UNet2DModel`` is fed the continuous
  timestep ``1000 t``; the export bakes the sinusoidal embedding of ``1000 t_j`` at every timestep ``j`` of the
  exported schedule into a *learned* (table) time embedding, folds the null-label embedding of a
  class-conditional network into the time-embedding bias, and declares ``v_prediction`` (``param="v"``) or
  ``epsilon``. This is exact when the network's input and output scalings are 1 (``data_std = 1``, the default);
  other ``data_std`` values are refused with a clear message. The exported U-Net is checked against the
  original at a few timesteps before anything is written.
* any object with a ``to_diffusers() -> (UNet2DModel, scheduler_config)`` method.

diffusers is a core dependency, imported lazily so that ``import scoredensity`` stays fast.

Weights are read only from ``diffusion_pytorch_model.safetensors``; a folder with only the pickle-based
``diffusion_pytorch_model.bin`` is refused (scoredensity never unpickles), and the safetensors header is checked
against the file's size first, so a truncated or corrupted file is a one-line error naming it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapters import DiffusersEps, betas_from_scheduler_config, scheduler_config_dict
from .errors import InputFileError
from .schedules import DDPMSchedule

__all__ = [
    "LoadedDiffusers",
    "load_diffusers",
    "load_diffusers_eps",
    "save_diffusers",
    "check_safetensors_file",
    "WEIGHT_NAMES",
]

WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
"""Weight files diffusers' ``from_pretrained`` reads; scoredensity loads only the first (safetensors): the
second is a pickle and is refused with a message saying how to convert it."""


def _diffusers():
    import diffusers  # a core dependency; imported lazily only to keep ``import scoredensity`` fast

    return diffusers


@dataclass(frozen=True)
class LoadedDiffusers:
    """A model loaded from a local diffusers folder.

    Attributes:
        model: the network (e.g. ``UNet2DModel``) in eval mode.
        scheduler_config: the scheduler's config dict (with ``_class_name``).
        info: where things came from (``path``, ``model_dir``, ``scheduler_config_path``, ``model_class``).
    """

    model: nn.Module
    scheduler_config: dict[str, Any]
    info: dict[str, str] = field(default_factory=dict)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputFileError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise InputFileError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def check_safetensors_file(model_dir: str | Path) -> Path:
    """The model folder's ``diffusion_pytorch_model.safetensors``, its header checked without loading a tensor:
    an 8-byte little-endian header length, a JSON header whose tensors' byte ranges lie inside the file.

    Returns:
        the weight file's path.

    Raises:
        InputFileError: only the pickle ``.bin`` present (never unpickled), or a truncated/corrupted file.
    """
    model_dir = Path(model_dir)
    path = model_dir / WEIGHT_NAMES[0]
    if not path.is_file():
        if (model_dir / WEIGHT_NAMES[1]).is_file():
            raise InputFileError(
                f"{model_dir / WEIGHT_NAMES[1]}: pickle weights are never loaded (a pickle can run code); convert the "
                f"folder to safetensors (diffusers: model.save_pretrained(folder, safe_serialization=True))"
            )
        raise InputFileError(f"{path}: missing")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise InputFileError(f"{path}: truncated safetensors file ({size} bytes)")
        n = int.from_bytes(head, "little")
        if n < 2 or 8 + n > size or n > 100_000_000:
            raise InputFileError(f"{path}: not a safetensors file or truncated (header of {n} bytes, file {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise InputFileError(f"{path}: corrupted safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise InputFileError(f"{path}: corrupted safetensors header (not a JSON object)")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offs = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) for o in offs)):
            raise InputFileError(f"{path}: corrupted safetensors header (entry {name!r})")
        end = max(end, offs[1])
    if 8 + n + end > size:
        raise InputFileError(
            f"{path}: truncated: its header needs {8 + n + end} bytes, the file has {size} (an interrupted download "
            "or copy?)"
        )
    return path


def _locate(path: Path) -> tuple[Path, Path | None, str | None, list[str]]:
    """``(model_dir, scheduler_config_path, model_class, missing)`` of a pipeline or bare model folder."""
    if (path / "model_index.json").is_file():
        index = _read_json(path / "model_index.json")
        if "unet" not in index:
            comps = sorted(k for k in index if not k.startswith("_"))
            raise ValueError(f"{path}/model_index.json has no 'unet' component (components: {comps})")
        entry = index["unet"]
        cls = entry[1] if isinstance(entry, list) and len(entry) == 2 else None
        model_dir, sched = path / "unet", path / "scheduler" / "scheduler_config.json"
        missing = [] if sched.is_file() else [str(sched)]
    elif (path / "config.json").is_file():
        model_dir, cls = path, None
        candidates = [
            path / "scheduler_config.json",
            path.parent / "scheduler" / "scheduler_config.json",
            path / "scheduler" / "scheduler_config.json",
        ]
        sched = next((c for c in candidates if c.is_file()), None)
        missing = [] if sched else [" or ".join(str(c) for c in candidates)]
    else:
        raise FileNotFoundError(
            f"{path} is neither a diffusers pipeline folder (no model_index.json) nor a model folder (no config.json)"
        )
    if not (model_dir / "config.json").is_file():
        missing.insert(0, str(model_dir / "config.json"))
    if not any((model_dir / w).is_file() for w in WEIGHT_NAMES):
        missing.insert(0, f"{model_dir}/{WEIGHT_NAMES[0]} (or {WEIGHT_NAMES[1]})")
    return model_dir, sched, cls, missing


def load_diffusers(
    path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> LoadedDiffusers:
    """Load the U-Net and the scheduler config of a local diffusers pipeline or model folder (never the hub).

    Args:
        path: a local folder (layouts in the module docstring).
        device: where to put the network. dtype: its parameter dtype.

    Returns:
        the model in eval mode with frozen parameters (``requires_grad`` False: estimators need no weight
        gradients, and a trainable model would keep every autograd graph), its scheduler config and provenance.

    Raises:
        FileNotFoundError: the folder does not exist, or names every missing file (weights, configs).
        InputFileError: only pickle (``.bin``) weights, truncated or corrupted safetensors weights.
        ValueError: the pipeline has no ``unet``, or the model class is not a diffusers model.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a local folder (scoredensity never downloads models from the hub)")
    model_dir, sched, cls_name, missing = _locate(path)
    if missing:
        raise FileNotFoundError(f"incomplete diffusers folder {path}: missing " + "; ".join(missing))
    cls_name = cls_name or _read_json(model_dir / "config.json").get("_class_name")
    diffusers = _diffusers()
    cls = getattr(diffusers, str(cls_name), None)
    if cls is None or not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)):
        raise ValueError(f"{model_dir}/config.json names model class {cls_name!r}, which is not a diffusers model")
    weights = check_safetensors_file(model_dir)
    try:
        model = cls.from_pretrained(
            model_dir, local_files_only=True, torch_dtype=dtype, low_cpu_mem_usage=False, use_safetensors=True
        )
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        msg = " ".join(str(e).split())[:300]
        raise InputFileError(f"{weights}: diffusers cannot load these weights ({type(e).__name__}: {msg})") from e
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    config = _read_json(sched)
    info = {
        "path": str(path),
        "model_dir": str(model_dir),
        "scheduler_config_path": str(sched),
        "model_class": str(cls_name),
        "scheduler_class": str(config.get("_class_name", "")),
    }
    return LoadedDiffusers(model=model, scheduler_config=config, info=info)


def load_diffusers_eps(
    path: str | Path,
    *,
    timesteps: str | None = None,
    out_of_range: str = "raise",
    prediction_type: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> DiffusersEps:
    """A local diffusers folder as a canonical ``EpsFn`` (:class:`~scoredensity.adapters.DiffusersEps`).

    ``timesteps=None`` picks ``"interpolated"``, or ``"nearest"`` for a network with a learned (table) time
    embedding, which only accepts integer timesteps. Other arguments as in :class:`DiffusersEps` and
    :func:`load_diffusers`. The loader's ``info`` is attached as ``.source``. The network is frozen
    (``requires_grad`` False) and in eval mode, so estimators keep no autograd graph of its weights.
    """
    loaded = load_diffusers(path, device=device, dtype=dtype)
    if timesteps is None:
        timesteps = "nearest" if _table_time_embedding(loaded.model) else "interpolated"
    eps = DiffusersEps(
        loaded.model,
        loaded.scheduler_config,
        prediction_type=prediction_type,
        timesteps=timesteps,
        out_of_range=out_of_range,  # type: ignore[arg-type]
    )
    eps.source = loaded.info
    return eps


def _table_time_embedding(model: Any) -> bool:
    config = getattr(model, "config", None)
    return isinstance(config, Mapping) and config.get("time_embedding_type") == "learned"


# ---------------------------------------------------------------------------------------------- export
def _default_scheduler_config(prediction_type: str) -> dict[str, Any]:
    return {
        "num_train_timesteps": 1000,
        "beta_start": 1e-4,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "prediction_type": prediction_type,
        "variance_type": "fixed_small",
    }


def _scheduler_config_of(scheduler: Any, prediction_type: str) -> dict[str, Any]:
    if scheduler is None:
        return _default_scheduler_config(prediction_type)
    if isinstance(scheduler, DDPMSchedule):
        config = _default_scheduler_config(prediction_type)
        config.pop("beta_start"), config.pop("beta_end"), config.pop("beta_schedule")
        config.update(num_train_timesteps=scheduler.num_steps, trained_betas=scheduler.betas.tolist())
        return config
    config = scheduler_config_dict(scheduler)
    config["prediction_type"] = prediction_type
    return config


def _bake_unet_denoiser(model: nn.Module, config: dict[str, Any]) -> nn.Module:
    """A ``UNet2DModel`` in diffusers' convention equal to ``nets.UNetDenoiser`` ``model`` at every timestep of
    ``config`` (module docstring)."""
    diffusers = _diffusers()
    cfg = model.config
    if abs(float(cfg.get("data_std", 1.0)) - 1.0) > 0:
        raise ValueError(
            f"cannot export a denoiser with data_std = {cfg['data_std']}: its input scaling c_in(t) has no place in a "
            f"diffusers UNet2DModel; train with data_std = 1 (the default) to export"
        )
    unet = model.unet
    ucfg = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    if ucfg.get("time_embedding_type", "positional") != "positional":
        raise ValueError(f"cannot export a U-Net with time_embedding_type {ucfg.get('time_embedding_type')!r}")
    times = DDPMSchedule(betas=betas_from_scheduler_config(config)).times  # [T] float64
    ucfg.update(time_embedding_type="learned", num_train_timesteps=len(times), num_class_embeds=None)
    ucfg.pop("class_embed_type", None)
    out = diffusers.UNet2DModel(**ucfg).to(device=unet.device)
    if out.dtype != unet.dtype:
        out = out.to(dtype=unet.dtype)
    state = {k: v for k, v in unet.state_dict().items() if not k.startswith(("time_proj.", "class_embedding."))}
    missing, unexpected = out.load_state_dict(state, strict=False)
    if unexpected or set(missing) != {"time_proj.weight"}:
        raise RuntimeError(f"U-Net export: unexpected state mismatch (missing {missing}, unexpected {unexpected})")
    with torch.no_grad():
        # the network is fed 1000 t as float32 (nets.UNetDenoiser); bake its sinusoidal features per timestep
        lam = torch.log1p(-times) - torch.log(times)
        fed = torch.sigmoid(-lam).to(torch.float32) * 1000.0
        out.time_proj.weight.copy_(unet.time_proj(fed.to(unet.device)).to(out.time_proj.weight.dtype))
        if unet.class_embedding is not None:  # unconditional = the null label, a constant added after the MLP
            null = torch.tensor([int(cfg["num_classes"])], device=unet.device)
            out.time_embedding.linear_2.bias.add_(unet.class_embedding(null)[0])
    return out


def _is_unet_denoiser(model: Any) -> bool:
    """A ``nets.UNetDenoiser`` (duck-typed: a canonical-time module with a ``UNet2DModel`` at ``.unet``)."""
    config = getattr(model, "config", None)
    return isinstance(config, Mapping) and config.get("type") == "unet" and hasattr(model, "unet")


def _check_export(original: Any, exported: DiffusersEps, shape: tuple[int, ...], steps: int = 4) -> None:
    """Compare the exported network with the original canonical ``eps`` at a few grid timesteps."""
    g = torch.Generator().manual_seed(0)
    j = torch.linspace(0, exported.num_train_timesteps - 1, steps).round().long()
    x = torch.randn((steps, *shape), generator=g)
    with torch.no_grad():
        want = original(x, exported.times[j])
        got = exported.eps_at_step(x, j)
    err = float((want - got).abs().max())
    scale = float(want.abs().max()) + 1.0
    if not err <= 1e-4 * scale:
        raise RuntimeError(f"exported U-Net differs from the original by {err:.3g} (tolerance {1e-4 * scale:.3g})")


def save_diffusers(
    model: Any,
    path: str | Path,
    *,
    scheduler: Mapping[str, Any] | DDPMSchedule | Any | None = None,
    check: bool = True,
) -> Path:
    """Save a model as a diffusers pipeline folder that ``DDPMPipeline.from_pretrained(path)`` loads and samples.

    Args:
        model: a :class:`~scoredensity.adapters.DiffusersEps`, a ``nets.UNetDenoiser`` (canonical time; exported
            exactly at the timesteps of ``scheduler``, see the module docstring), an object with
            ``to_diffusers()``, or a bare diffusers ``UNet2DModel`` (then ``scheduler`` must give its config,
            with its ``prediction_type``).
        path: output folder (created).
        scheduler: the schedule to export with: a config dict or scheduler, or a
            :class:`~scoredensity.schedules.DDPMSchedule` (written as ``trained_betas``). Default for a
            ``UNetDenoiser``: diffusers' linear 1000-step schedule; for a ``DiffusersEps``: its own.
        check: for a ``UNetDenoiser``, compare the exported network with the original before writing.

    Returns:
        The folder path.

    Raises:
        TypeError: for a model that cannot be exported. ValueError: for a network whose convention a diffusers
        ``UNet2DModel`` cannot express (``data_std != 1``).
    """
    diffusers = _diffusers()
    path = Path(path)
    if isinstance(model, DiffusersEps):
        unet = model.model
        config = _scheduler_config_of(scheduler or model.scheduler_config, model.prediction_type)
    elif _is_unet_denoiser(model):
        prediction_type = "v_prediction" if model.config.get("param", "v") == "v" else "epsilon"
        config = _scheduler_config_of(scheduler, prediction_type)
        unet = _bake_unet_denoiser(model, config)
        if check:
            _check_export(model, DiffusersEps(unet, config, timesteps="nearest"), tuple(model.config["shape"]))
    elif hasattr(model, "to_diffusers"):
        unet, config = model.to_diffusers()
        config = scheduler_config_dict(config)
    elif isinstance(model, diffusers.ModelMixin):
        if scheduler is None:
            raise ValueError("exporting a bare diffusers model needs scheduler= (its config, with prediction_type)")
        unet = model
        config = scheduler_config_dict(scheduler) if not isinstance(scheduler, DDPMSchedule) else None
        if config is None:
            raise ValueError("give a bare model's scheduler as a config dict, so its prediction_type is explicit")
    else:
        raise TypeError(
            f"cannot export {type(model).__name__}: expected DiffusersEps, nets.UNetDenoiser, a diffusers model, "
            f"or an object with to_diffusers()"
        )
    if not isinstance(unet, diffusers.ModelMixin):
        raise TypeError(f"the network to export must be a diffusers model, got {type(unet).__name__}")
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    sched = diffusers.DDPMScheduler.from_config(config)
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=sched)
    path.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(path, safe_serialization=True)
    return path
