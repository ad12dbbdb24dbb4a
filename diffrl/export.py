"""Getting the tuned weights out of a run folder: ``diffrl export`` and :func:`load_run_model`.

A run folder (``RUN/config.yaml``, ``RUN/checkpoints/step_NNNNNN/``, layout in
``diffrl.learner.checkpoint``) holds, per checkpoint, every role's trained tensors as
``<role>.safetensors``: the EMA roles (CRD: p_old, p_samp) and the trainable ones (theta), by
parameter name; LoRA runs hold the adapter tensors only (peft naming, with the adapter name). This
module puts them back into the run's base model (its config.yaml ``model`` section) and writes what
diffusers loads:

* full fine-tunes: a diffusers pipeline folder (``save_pretrained``) with the tuned denoiser;
* LoRA runs: ``OUT/pytorch_lora_weights.safetensors`` in diffusers' LoRA format (keys
  ``transformer.<module>.lora_A.weight``, or ``unet.`` for the shapes world's UNet), written by
  diffusers' own ``save_lora_weights`` with the adapter's LoraConfig (r, lora_alpha, target_modules)
  as ``lora_adapter_metadata``, so ``load_lora_weights`` rebuilds the alpha/r scaling. With a diffusers
  that cannot write that metadata, alpha/r is folded into lora_B instead (a loader without metadata
  assumes alpha = r, i.e. scale 1);

plus ``README.md`` and ``export.json`` naming the base model, the run, the step, the role and how to
load it.

Why θ is read from ``theta.safetensors`` and not from the DeepSpeed engine folder: the engine folder
is written with torch.save (pickle) and only the learner that wrote it reads it back
(docs/security.md); export must be safe on a run folder from elsewhere, must not need DeepSpeed's
ZeRO layout (stage 0 keeps the weights in ``mp_rank_00_model_states.pt``, stages 1-3 in optimizer
partitions), and for LoRA must give the adapters alone. So the learner also writes each trainable
role's trained tensors as safetensors at every checkpoint (gathered under ZeRO-3; in the training
dtype), and export reads only safetensors. A checkpoint written before that has no
``theta.safetensors``: θ cannot be exported from it (p_samp can).

``weights``: ``p_samp`` is the algorithm's evaluated role, the model the evaluations used: its sampler
role (CRD with the decoupled sampler: p_samp; NFT, GRPO: p_old) unless it names another (TDM-R1: the
EMA of its generator, ``gen_ema``); ``theta`` the trainable role. Any
other role name with a file in the checkpoint (e.g. ``p_old``) is accepted by the functions here.
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import shutil
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from diffrl import run_folder
from diffrl.config import ConfigError, load_config_text, to_dict
from diffrl.learner import checkpoint as ckpt

WEIGHTS = ("p_samp", "theta")
"""What ``--weights`` chooses: the sampler role (what was evaluated) or the trainable role."""
LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"
"""diffusers' default LoRA weight name (what ``load_lora_weights(OUT)`` looks for)."""
INFO_FILE = "export.json"
README_FILE = "README.md"
_ADAPTER = "default"  # peft's adapter name in the learner's modules (inject_adapter_in_model's default)
_ADAPTER_NAME_RE = re.compile(rf"\.(lora_[A-Za-z_]+)\.{_ADAPTER}(?=\.|$)")


class ExportError(ValueError):
    """A run folder, checkpoint, step or role that cannot be exported (the message says why)."""


# ------------------------------------------------------------------------------------ locating


def _latest(run_dir: Path) -> Path | None:
    try:
        return ckpt.latest_checkpoint(run_dir)
    except (OSError, ValueError) as err:
        raise ExportError(f"{run_dir}: {err}") from None


def _complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of the checkpoints that can be read: state.json written, not newer than the
    one ``latest`` names (a newer folder may still be in progress)."""
    latest = _latest(run_dir)
    if latest is None:
        return []
    latest_step = int(latest.name.removeprefix("step_"))
    return [(s, p) for s, p in ckpt.list_checkpoints(run_dir) if s <= latest_step and (p / ckpt.STATE_FILE).is_file()]


def _steps_text(run_dir: Path) -> str:
    steps = [s for s, _ in _complete_checkpoints(run_dir)]
    return ", ".join(map(str, steps)) if steps else "none"


def resolve_checkpoint(path: str | Path, step: int | None = None) -> tuple[Path, Path]:
    """``(run_dir, checkpoint_dir)`` of ``path``: a run folder (its ``latest`` checkpoint, or the one of
    ``step``) or a checkpoint folder ``RUN/checkpoints/step_N`` (its run folder is two levels up; a
    ``step`` other than N is an error). Raises :class:`ExportError` with what is there instead."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ExportError(f"{p}: no such folder (expected a run folder or RUN/checkpoints/step_N)")
    if not p.is_dir():
        raise ExportError(f"{p}: not a folder (expected a run folder or RUN/checkpoints/step_N)")
    if re.fullmatch(r"step_\d{6,}", p.name) and p.parent.name == ckpt.CHECKPOINTS:
        run_dir, n = p.parent.parent, int(p.name.removeprefix("step_"))
        if step is not None and step != n:
            raise ExportError(f"{p} is the checkpoint of step {n}, but step {step} was asked for")
        if not (p / ckpt.STATE_FILE).is_file():
            raise ExportError(f"{p} is incomplete (no {ckpt.STATE_FILE}: written last, so its writer stopped "
                              f"before the end); complete checkpoints of {run_dir}: steps {_steps_text(run_dir)}")
        return run_dir, p
    if p.name == ckpt.CHECKPOINTS and (p.parent / run_folder.CONFIG).is_file():
        p = p.parent
    if not ((p / run_folder.CONFIG).is_file() or (p / ckpt.CHECKPOINTS).is_dir()):
        raise ExportError(f"{p}: not a run folder (no {run_folder.CONFIG}, no {ckpt.CHECKPOINTS}/) nor a "
                          f"checkpoint folder RUN/{ckpt.CHECKPOINTS}/step_N")
    if step is None:
        folder = _latest(p)
        if folder is None:
            raise ExportError(f"{p} has no checkpoint yet ({ckpt.CHECKPOINTS}/{ckpt.LATEST} is missing): the learner "
                              "writes one every learner.checkpoint_every steps and at the end of the run")
        return p, folder
    found = dict(_complete_checkpoints(p))
    if step not in found:
        raise ExportError(f"{p} has no checkpoint of step {step}; available steps: {_steps_text(p)}")
    return p, found[step]


@dataclass
class RunSections:
    """The parts of a run's recipe that export needs."""

    model: Any  # diffrl.models.config.ModelConfig: the base model
    learner: Any  # diffrl.learner.config.LearnerConfig: algorithm (its sampler role) and LoRA
    sampling: Any  # diffrl.models.config.SamplingConfig: how the samplers sampled (told in README.md)


def load_run_config(run_dir: str | Path) -> RunSections:
    """The ``model``, ``learner`` and ``sampler.sampling`` sections of the run's recipe
    (``config.resumed.yaml`` of a resumed run, else ``config.yaml``), each loaded and validated with
    :func:`diffrl.config.load_config_text` on its own schema. Only these: the rest of the recipe
    (reward servers and their scorers, prompt files, services, ``run.resume``) may not exist on the
    machine that exports, and need not."""
    from omegaconf import OmegaConf

    from diffrl.learner.config import LearnerConfig
    from diffrl.models.config import ModelConfig, SamplingConfig

    run_dir = Path(run_dir)
    file = next((run_dir / n for n in (run_folder.CONFIG_RESUMED, run_folder.CONFIG) if (run_dir / n).is_file()), None)
    if file is None:
        raise ExportError(f"{run_dir}: no {run_folder.CONFIG} (the run's recipe names its base model)")
    try:
        recipe = OmegaConf.load(file)
    except Exception as err:  # noqa: BLE001 - YAML errors of any kind
        raise ExportError(f"{file} is not valid YAML: {err}") from None
    parts = {}
    for key, schema in (("model", ModelConfig), ("learner", LearnerConfig), ("sampler.sampling", SamplingConfig)):
        section = OmegaConf.select(recipe, key, default=None)
        try:
            parts[key] = load_config_text(schema, OmegaConf.to_yaml(section) if section is not None else "{}")
        except ConfigError as err:
            raise ExportError(f"{file}: {key}: {err}") from None
    return RunSections(model=parts["model"], learner=parts["learner"], sampling=parts["sampler.sampling"])


# ------------------------------------------------------------------------------------ loading


@dataclass
class RunWeights:
    """What :func:`load_run_weights` found: where, which role, and how to rebuild it."""

    run_dir: Path
    checkpoint: Path
    step: int
    weights: str  # as asked: p_samp, theta, or a role name
    role: str  # the role whose file was read
    algorithm: str
    base: str  # the base model's path or hub id
    lora: Any  # the run's diffrl.models.lora.LoraConfig, or None for a full fine-tune
    config: RunSections  # the run's recipe (what export needs of it)
    tensors: dict[str, torch.Tensor]


def _role_of(cfg, weights: str) -> str:
    if weights == "p_samp":  # the evaluated role: the sampler's (TDM-R1: the EMA of its generator)
        learner = cfg.learner
        return learner.algorithm_class(learner.algorithm_config, learner).evaluated_role
    return weights


def load_run_weights(path: str | Path, step: int | None = None, weights: str = "p_samp",
                     base: str | None = None) -> RunWeights:
    """The chosen role's tensors of a checkpoint and everything needed to apply them (no model loaded)."""
    run_dir, folder = resolve_checkpoint(path, step)
    cfg = load_run_config(run_dir)
    state = ckpt.read_json(folder / ckpt.STATE_FILE)
    roles = list(state.get("roles", []))
    role = _role_of(cfg, weights)
    if role not in roles:
        raise ExportError(f"{folder}: no role {weights!r}; this {state.get('algorithm')} run has {roles} "
                          f"(--weights takes {' or '.join(WEIGHTS)})")
    file = folder / ckpt.snapshot_file(role)
    if not file.is_file():
        if (folder / ckpt.engine_tag(role)).is_dir():
            raise ExportError(f"{folder} has no {file.name}: it was written before the learner saved its trainable "
                              f"roles as safetensors, and its {ckpt.engine_tag(role)}/ folder is DeepSpeed pickle, "
                              f"which is only read by the learner itself (docs/security.md). Export --weights p_samp, "
                              f"or resume the run to write a new checkpoint")
        raise ExportError(f"{folder}: role {role!r} has no weights file (the frozen base model is not exported)")
    lora_on = bool(state.get("lora", False))
    if lora_on != cfg.learner.lora.enabled:
        raise ExportError(f"{folder} says lora={lora_on} but the run's config says learner.lora.enabled="
                          f"{cfg.learner.lora.enabled}")
    return RunWeights(run_dir=run_dir, checkpoint=folder, step=int(state["step"]), weights=weights, role=role,
                      algorithm=str(state.get("algorithm", cfg.learner.algorithm)),
                      base=base or cfg.model.path, lora=cfg.learner.lora if lora_on else None, config=cfg,
                      tensors=ckpt.load_tensors(file))


def peft_names(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Module parameter names (``...lora_A.default.weight``) -> peft's state-dict names
    (``...lora_A.weight``, what ``set_peft_model_state_dict`` and diffusers take)."""
    return {_ADAPTER_NAME_RE.sub(r".\1", k): v for k, v in tensors.items()}


def apply_weights(denoiser: torch.nn.Module, tensors: dict[str, torch.Tensor], lora=None, where: str = "") -> None:
    """Put a role's trained tensors into ``denoiser`` in place: every parameter (full fine-tune, names
    and shapes must match exactly) or, with ``lora`` (a LoraConfig), inject the adapters and load them."""
    if lora is not None:
        from peft import get_peft_model_state_dict

        from diffrl.models.lora import load_lora_weights

        adapters = peft_names(tensors)
        load_lora_weights(denoiser, adapters, lora)
        have = get_peft_model_state_dict(denoiser)
        missing = sorted(set(have) - set(adapters))
        if missing:
            raise ExportError(f"{where}: lacks adapter tensors of the denoiser {missing[:3]} (learner.lora differs "
                              "from the run's?)")
        return
    named = dict(denoiser.named_parameters())
    missing, unexpected = sorted(set(named) - set(tensors)), sorted(set(tensors) - set(named))
    if missing or unexpected:
        raise ExportError(f"{where}: does not fit the base model: missing {missing[:3]}, unexpected {unexpected[:3]} "
                          "(is model.path the run's base model?)")
    with torch.no_grad():
        for name, p in named.items():
            src = tensors[name]
            if tuple(src.shape) != tuple(p.shape):
                raise ExportError(f"{where}: {name} has shape {tuple(src.shape)}, the base model {tuple(p.shape)}")
            p.copy_(src.to(p.device, p.dtype))


def _load(path, step, weights, device, dtype, base):
    from diffrl.models.adapter import FlowModel

    found = load_run_weights(path, step, weights, base)
    model_cfg = replace(found.config.model, path=found.base, device=device, dtype=dtype)
    try:
        model = FlowModel.from_config(model_cfg)
    except (OSError, ValueError) as err:
        raise ExportError(f"cannot load the run's base model {found.base!r} ({err}); if it moved, give its "
                          "new place with --base") from None
    apply_weights(model.transformer, found.tensors, found.lora,
                  str(found.checkpoint / ckpt.snapshot_file(found.role)))
    return model, found


def load_run_model(path: str | Path, step: int | None = None, weights: str = "p_samp", device: str = "cpu",
                   dtype: str = "float32", base: str | None = None):
    """The run's base model (:class:`diffrl.models.adapter.FlowModel`, from its config.yaml ``model``
    section; ``base`` overrides where it is) with a checkpoint's weights applied: ``weights='p_samp'``
    the sampler role (what the samplers and evaluations used), ``'theta'`` the trainable role. ``path``:
    a run folder (its latest checkpoint, or ``step``) or ``RUN/checkpoints/step_N``. LoRA runs: the
    adapters are injected (the run's ``learner.lora``) and loaded into the denoiser."""
    return _load(path, step, weights, device, dtype, base)[0]


# ------------------------------------------------------------------------------------ writing


def _pipeline_import(pipe) -> tuple[str, str]:
    """(import line, class name) of a pipeline's class."""
    cls = type(pipe)
    module = "diffusers" if cls.__module__.startswith("diffusers") else cls.__module__
    return f"from {module} import {cls.__name__}", cls.__name__


def lora_metadata(lora) -> dict[str, Any]:
    """The adapter's peft LoraConfig kwargs that diffusers rebuilds it from (``lora_adapter_metadata``)."""
    return {"r": int(lora.rank), "lora_alpha": float(lora.alpha), "target_modules": list(lora.target_modules),
            "lora_dropout": 0.0}


def _writes_lora_metadata(save_lora_weights, component: str) -> bool:
    return f"{component}_lora_adapter_metadata" in inspect.signature(save_lora_weights).parameters


def write_lora(out: Path, model, lora, dtype: torch.dtype = torch.float32, fold: bool | None = None) -> Path:
    """``out/pytorch_lora_weights.safetensors`` of ``model``'s denoiser adapters, written by diffusers'
    ``save_lora_weights`` (SD3: StableDiffusion3Pipeline's, ``transformer.`` keys; the shapes world's
    UNet: StableDiffusionPipeline's, ``unet.`` keys). ``fold``: multiply lora_B by alpha/r and write no
    metadata (for loaders that ignore it); None = only when the installed diffusers cannot write the
    metadata."""
    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline
    from peft import get_peft_model_state_dict

    component = model.denoiser_name  # transformer (SD3) or unet (FlowUNetPipeline)
    writer = (StableDiffusion3Pipeline if component == "transformer" else StableDiffusionPipeline).save_lora_weights
    if fold is None:
        fold = not _writes_lora_metadata(writer, component)
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in get_peft_model_state_dict(model.transformer).items()}
    kwargs: dict[str, Any] = {f"{component}_lora_layers": tensors}
    if fold:
        scale = float(lora.alpha) / float(lora.rank)
        tensors.update({k: (v.float() * scale).to(dtype) for k, v in tensors.items() if ".lora_B." in k})
    else:
        kwargs[f"{component}_lora_adapter_metadata"] = lora_metadata(lora)
    writer(str(out), weight_name=LORA_WEIGHTS_FILE, **kwargs)
    return out / LORA_WEIGHTS_FILE


def load_snippet(kind: str, out: Path, base: str, pipe, component: str) -> list[str]:
    """Lines of Python that load an export. Components the pipeline lacks (the shapes world's pixel-space
    SD3 has no VAE and no T5) are passed as None, as diffusers requires for non-optional ones."""
    imp, cls = _pipeline_import(pipe)
    optional = set(getattr(type(pipe), "_optional_components", []))
    absent = "".join(f", {name}=None" for name, module in pipe.components.items()
                     if module is None and name not in optional)
    if kind == "full":
        return [imp, f"pipe = {cls}.from_pretrained({json.dumps(str(out))}{absent})"]
    load = f"pipe = {cls}.from_pretrained({json.dumps(base)}{absent})"
    if component == "transformer":
        return [imp, load, f"pipe.load_lora_weights({json.dumps(str(out))})"]
    return [imp, load, (f'pipe.{component}.load_lora_adapter({json.dumps(str(out))}, prefix="{component}", '
                       f'weight_name="{LORA_WEIGHTS_FILE}")')]


def _base_for_others(base: str) -> str:
    from diffrl.models.adapter import resolve_model_path

    resolved = resolve_model_path(base)
    return str(Path(resolved).resolve()) if Path(resolved).exists() else base


def export(path: str | Path, out: str | Path, step: int | None = None, weights: str = "p_samp",
           dtype: str = "float32", base: str | None = None) -> dict[str, Any]:
    """Write a checkpoint's weights where diffusers loads them (module docstring): full fine-tunes a
    pipeline folder, LoRA runs ``OUT/pytorch_lora_weights.safetensors``; plus README.md and
    export.json. ``dtype``: of the written weights (the tuned tensors are applied in float32 first).
    Returns what export.json says (``files``, ``load``: the loading snippet, ...)."""
    from diffrl.utils import DTYPES

    if dtype not in DTYPES:
        raise ExportError(f"dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} exists and is not an empty folder: export into a new one")
    model, found = _load(path, step, weights, "cpu", "float32", base)
    torch_dtype = DTYPES[dtype]
    base_ref = _base_for_others(found.base)
    component = model.denoiser_name
    out.mkdir(parents=True, exist_ok=True)
    if found.lora is None:
        kind = "full"
        if torch_dtype != torch.float32:
            model.pipe.to(dtype=torch_dtype)
        model.save_pretrained(out)
    else:
        kind = "lora"
        write_lora(out, model, found.lora, torch_dtype)
    snippet = load_snippet(kind, out.resolve(), base_ref, model.pipe, component)
    sampling = found.config.sampling
    info = {
        "kind": kind,
        "base_model": base_ref,
        "run_dir": str(found.run_dir.resolve()),
        "checkpoint": str(found.checkpoint.resolve()),
        "step": found.step,
        "weights": found.weights,
        "role": found.role,
        "algorithm": found.algorithm,
        "dtype": dtype,
        "pipeline_class": type(model.pipe).__name__,
        "lora": None if found.lora is None else {**lora_metadata(found.lora), "weight_name": LORA_WEIGHTS_FILE,
                                                 "component": component},
        # T5 tokens per prompt (0: the pipeline has no T5, or the run dropped it)
        "max_sequence_length": int(getattr(model, "max_sequence_length", found.config.model.max_sequence_length)),
        "resolution": getattr(model, "resolution", None),  # image side the run sampled at (height=width=)
        "sampling": to_dict(sampling),
        "load": snippet,
    }
    (out / INFO_FILE).write_text(json.dumps(info, indent=1) + "\n")
    (out / README_FILE).write_text(_readme(info))
    info["files"] = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    return info


def _readme(info: dict[str, Any]) -> str:
    what = ("a diffusers pipeline folder: the base model with the tuned denoiser" if info["kind"] == "full" else
            f"LoRA adapters of the denoiser ({LORA_WEIGHTS_FILE}, diffusers format, r={info['lora']['r']}, "
            f"alpha={info['lora']['lora_alpha']}) for the base model `{info['base_model']}`")
    s = info["sampling"]
    lines = [
        "# diffrl export", "",
        f"{what}.", "",
        (f"- run: `{info['run_dir']}` ({info['algorithm']}), step {info['step']}, weights `{info['weights']}` "
        f"(role `{info['role']}`), {info['dtype']}"),
        f"- base model: `{info['base_model']}` ({info['pipeline_class']})",
        f"- the run sampled with {s['num_steps']} Euler steps, guidance scale {s['guidance_scale']}, "
        f"shift {s['shift']}" + (f", at {info['resolution']} px (height=width={info['resolution']})"
                                 if info["resolution"] else "")
        + (f", max_sequence_length {info['max_sequence_length']}" if info["max_sequence_length"] else ""),
        "", "Load it:", "", "```python", *info["load"], "```", "",
    ]
    if info["pipeline_class"] == "FlowUNetPipeline":
        lines += [("FlowUNetPipeline is diffrl's container of the shapes-world UNet (diffrl.models.flow_pipeline); "
                  "sample with `diffrl.models.adapter.FlowModel(pipe).generate(prompts, seeds)`."), ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ CLI


def cmd_export(args: argparse.Namespace) -> int:
    import tempfile

    from diffrl.storage import StorageError, fetch_run, is_url, open_storage

    work = Path(tempfile.mkdtemp(prefix="diffrl-export-"))
    try:
        run_dir = args.run_dir
        if is_url(run_dir):  # a run in object storage: its recipe and one checkpoint's snapshots, fetched
            run_dir = str(fetch_run(run_dir, work / "runs", step=args.step))
        out = work / "out" if is_url(args.out) else Path(args.out)
        info = export(run_dir, out, step=args.step, weights=args.weights, dtype=args.dtype, base=args.base)
        if is_url(args.out):
            open_storage(args.out.rstrip("/")).put_tree(out, "")
    except (ExportError, StorageError) as err:
        print(f"diffrl export: {err}", file=sys.stderr)
        return 2
    finally:
        if is_url(args.out) or is_url(args.run_dir):
            shutil.rmtree(work, ignore_errors=True)
        else:
            work.rmdir()
    out = args.out if is_url(args.out) else Path(args.out)
    print(f"exported {info['weights']} (role {info['role']}) of {info['run_dir']} at step {info['step']} "
          f"({'LoRA adapters' if info['kind'] == 'lora' else 'full pipeline'}) to {out}:")
    for name in info["files"]:
        print(f"  {out}/{name}")
    print("load it with:")
    for line in info["load"]:
        print(f"  {line}")
    return 0


def register(sub) -> None:
    """Add ``export`` to the ``diffrl`` subcommands."""
    p = sub.add_parser(
        "export", help="write a run's tuned weights where diffusers loads them (pipeline folder or LoRA file)",
        description="Turn a checkpoint of a `diffrl train` run folder into what diffusers loads.\n"
                    "  full fine-tunes: a diffusers pipeline folder (save_pretrained: the run's base model\n"
                    "    with the tuned denoiser); load it with from_pretrained(OUT)\n"
                    "  LoRA runs: OUT/pytorch_lora_weights.safetensors (diffusers' LoRA format, the adapter's\n"
                    "    rank and alpha as metadata); load the base model, then load_lora_weights(OUT)\n"
                    "Also writes OUT/README.md and OUT/export.json (base model, run, step, role, how to load)\n"
                    "and prints the loading snippet. Reads only the checkpoint's safetensors files, never the\n"
                    "DeepSpeed engine folder (pickle). docs/training.md, \"Getting the weights out\".",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  diffrl export runs/shapes-crd --out exported/shapes-crd\n"
               "  diffrl export runs/sd35m-ocr --step 300 --weights theta --dtype bfloat16 --out exported/ocr-300\n"
               "  diffrl export runs/sd35m-ocr/checkpoints/step_000300 --out exported/ocr-300\n"
               "then, for a LoRA export:\n"
               "  from diffusers import StableDiffusion3Pipeline\n"
               "  pipe = StableDiffusion3Pipeline.from_pretrained(BASE); pipe.load_lora_weights(OUT)")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (its latest checkpoint unless --step), a "
                                                      "checkpoint folder RUN_DIR/checkpoints/step_N, or a run "
                                                      "in object storage (s3://bucket/runs/NAME)")
    p.add_argument("--step", type=int, default=None, metavar="N", help="the checkpoint of learner step N "
                                                                       "(default: the latest)")
    p.add_argument("--weights", choices=WEIGHTS, default="p_samp",
                   help="p_samp: the snapshot the run evaluated, the sampler's unless the algorithm evaluates "
                        "another (TDM-R1: the EMA of its generator) (default); "
                        "theta: the trained weights themselves")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (new or empty), or an object-storage "
                                                               "URL it is uploaded to")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="dtype of the written weights (default float32)")
    p.add_argument("--base", metavar="PATH", default=None,
                   help="the base model, if it is no longer where the run's config.yaml (model.path) says")
    p.set_defaults(func=cmd_export)
