"""Learning probes on the shapes world: quick, in-process experiments behind docs/results.md "Probes".
Not the service (no Ray, Redis or HTTP) and not tests: each prints one JSON line per measurement and
writes them to OUT/probe.jsonl.

    .venv/bin/python benchmarks/probes.py lockstep OUT --steps 100 --eval-every 25 [key=value ...]
        (key=value: dotted overrides of deploy/configs/shapes-cpu.yaml, as for ``diffrl train``)
    .venv/bin/python benchmarks/probes.py self-sft OUT --data own|renders --lr 1e-4 --steps 50
    .venv/bin/python benchmarks/probes.py grad-agreement OUT [--draws 6]
    .venv/bin/python benchmarks/probes.py pass-at-k OUT [--k 8] [--noise-scale 1.0]
    .venv/bin/python benchmarks/probes.py snapshot-eval OUT [--checkpoint RUN/checkpoints/step_N] [--seeds 8]

lockstep    The real ``Learner`` (DeepSpeed, the recipe's algorithm and LoRA settings) trained in
            lockstep on samples of its own p_samp (the recipe's sampling settings), scored in-process by
            the shapes detector; held-out evaluation of p_samp (eval split, 2 seeds, as the recipes) every
            ``--eval-every`` steps. Overrides are those of ``diffrl train`` (recipe: shapes-cpu.yaml).
            ``--prompts N`` trains on N fixed two-kind training prompts and also evaluates on them
            (16 seeds each): is the signal enough to learn prompts it trains on? ``--reward strict``
            trains on the binary strict reward; ``--shuffle-rewards`` permutes the rewards within each
            group (a control: what the update does without the reward's information).
``self-sft`` Plain flow-matching fine-tune of the whole base UNet (AdamW, batch 32, logit-normal σ) on
            fresh samples of the current model (``own``: CFG-1 Euler, ``--sample-steps`` 10, regenerated
            every step, optionally clamped to [-1, 1])
            or on ground-truth renders of the same prompts and seeds (``renders``).
``grad-agreement`` For one fixed batch of 4 prompts × 8 samples of the base model, the CRD matching-loss
            gradient (θ = p_old, no KL) under independent noise draws, per-sample ε vs one ε per group
            (``crd.group_shared_noise``): mean pairwise cosine between draws, at σ = 0.9, 0.5, 0.2.
``pass-at-k`` The base model's k samples per eval prompt (fixed seeds): the fraction correct (strict),
            and the fractions of prompts with a correct sample among the first k/2 and among all k.
            ``--noise-scale`` multiplies the initial noise (a sampling temperature below 1).
``snapshot-eval`` Held-out evaluation (eval split, ``--seeds`` fixed seeds per prompt, the recipes' 20-step
            CFG-1 sampling) of one snapshot of a full fine-tune's learner checkpoint (``p_samp``, the model
            the run samples with and evaluates; ``p_old``; or ``theta``, the trained weights), or of the base
            model without ``--checkpoint``. 8 seeds (504 images) cut the standard error of strict accuracy
            to about 0.018, half that of a run's 2-seed evaluation.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))

import numpy as np
import torch

RECIPE = REPO / "deploy" / "configs" / "shapes-cpu.yaml"
TRAINED_PROMPTS_EVAL_SEED = 900_000  # base of the fixed seeds of the --prompts evaluation


class Log:
    """Prints each record as a JSON line and appends it to OUT/probe.jsonl."""

    def __init__(self, out: str):
        from diffrl.job import JsonLines

        Path(out).mkdir(parents=True, exist_ok=True)
        self.lines = JsonLines(Path(out) / "probe.jsonl")

    def __call__(self, **record) -> None:
        print(json.dumps(record, default=float), flush=True)
        self.lines.write(record)


def score(model, x0, prompts):
    from diffrl.reward_servers.scorers import shapes as shapes_scorer

    return shapes_scorer.score_batch(model.to_uint8(model.decode(x0)), prompts)


def lockstep(args: argparse.Namespace) -> None:
    from diffrl.config import load_config
    from diffrl.data import load_prompt_set
    from diffrl.evaluation import evaluate
    from diffrl.job import trained_learner_config
    from diffrl.learner.learner import Learner
    from diffrl.learner.ray_learner import load_learner_model
    from diffrl.models import shapes_world
    from diffrl.proto import experience_pb2
    from diffrl.proto.codec import tensor_to_proto
    from diffrl.schema import TrainConfig

    cfg = load_config(TrainConfig, RECIPE, args.overrides)
    torch.set_num_threads(cfg.learner.torch_threads)
    lcfg = replace(trained_learner_config(cfg), max_steps=args.steps)
    model = load_learner_model(lcfg, cfg.model)
    log = Log(args.out)
    learner = Learner(lcfg, model, publisher=None, run_dir=args.out)
    G, K, s = lcfg.groups_per_step, cfg.sampler.k, cfg.sampler.sampling
    rng = random.Random(cfg.run.seed)
    prompts = shapes_world.train_prompts()
    if args.prompts:
        prompts = random.Random(7).sample([p for p in prompts if " and " in p], args.prompts)
    eval_cfg = replace(cfg.eval, seeds_per_prompt=2, grid_prompts=0)

    def evaluation(step: int) -> None:
        if args.prompts:
            flat = [p for p in prompts for _ in range(16)]
            x0 = model.sample(flat, [TRAINED_PROMPTS_EVAL_SEED + i for i in range(len(flat))], num_steps=eval_cfg.num_steps,
                              guidance_scale=eval_cfg.guidance_scale, transformer=learner.p_samp)
            sc = score(model, x0, flat)
            log(step=step, kind="eval_trained_prompts", strict=float(np.mean([x.strict for x in sc])),
                count=float(np.mean([x.count for x in sc])), partial=float(np.mean([x.partial for x in sc])))
        m = evaluate(model, eval_cfg, load_prompt_set("shapes:eval"), transformer=learner.p_samp)
        log(step=step, kind="eval", **{k: m[k] for k in ("strict", "count", "color", "shape", "fid_shapes",
                                                         "off_palette")})

    evaluation(0)
    start, next_seed, rewards = time.time(), 10**6 * (1 + cfg.run.seed), []
    for step in range(1, args.steps + 1):
        chosen = [rng.choice(prompts) for _ in range(G)]
        flat = [p for p in chosen for _ in range(K)]
        seeds = list(range(next_seed, next_seed + len(flat)))
        next_seed += len(flat)
        with torch.no_grad():
            x0 = model.sample(flat, seeds, num_steps=s.num_steps, guidance_scale=s.guidance_scale, shift=s.shift,
                              transformer=learner.p_samp)  # [G*K, C, H, W]
        sc = score(model, x0, flat)
        r = np.array([x.strict if args.reward == "strict" else x.partial for x in sc]).reshape(G, K)
        if args.shuffle_rewards:  # an independent permutation within each group
            r = np.random.default_rng(step).permuted(r, axis=1)
        groups = []
        for g, prompt in enumerate(chosen):
            group = experience_pb2.Group(group_id=f"probe:{step}:{g}", prompt=prompt, policy_version=learner.step,
                                         sampler_id="probe", created_at=time.time())
            for i in range(K):
                sample = group.samples.add(seed=seeds[g * K + i])
                sample.latent.CopyFrom(tensor_to_proto(x0[g * K + i].float().cpu()))
                sample.rewards[cfg.rewards[0].name] = float(r[g, i])
            groups.append(group)
        stats = learner.train_on_groups(groups)
        rewards.append(float(np.mean([x.partial for x in sc])))
        if step % 10 == 0:
            log(step=step, kind="train", seconds=round(time.time() - start, 1),
                partial_last10=float(np.mean(rewards[-10:])),
                **{k: stats.get(k) for k in ("r_hat_centered_std", "reward_corr", "kl_mean", "grad_norm")})
        if step % args.eval_every == 0 or step == args.steps:
            evaluation(step)
    learner.close()


def self_sft(args: argparse.Namespace) -> None:
    from diffrl.data import load_prompt_set
    from diffrl.evaluation import EvalConfig, evaluate
    from diffrl.models import shapes_world
    from diffrl.models.pretrain import load_base

    torch.set_num_threads(args.threads)
    model = load_base(device="cpu")
    net = model.transformer
    log = Log(args.out)
    eval_cfg = EvalConfig(seeds_per_prompt=2, guidance_scale=1.0, grid_prompts=0)

    def evaluation(step: int) -> None:
        net.eval()
        m = evaluate(model, eval_cfg, load_prompt_set("shapes:eval"), transformer=net)
        log(step=step, kind="eval", **{k: m[k] for k in ("strict", "count", "fid_shapes", "off_palette")})

    evaluation(0)
    prompts, rng = shapes_world.train_prompts(), random.Random(0)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(0)
    next_seed = 5_000_000
    for step in range(1, args.steps + 1):
        batch = [rng.choice(prompts) for _ in range(32)]
        seeds = list(range(next_seed, next_seed + 32))
        next_seed += 32
        if args.data == "renders":
            images = shapes_world.render_batch(batch, np.array(seeds))  # [B, H, W, 3] uint8
            x0 = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1  # [B, 3, H, W]
        else:
            net.eval()
            with torch.no_grad():
                x0 = model.sample(batch, seeds, num_steps=args.sample_steps, guidance_scale=1.0)  # [B, 3, H, W]
            if args.clamp:
                x0 = x0.clamp(-1, 1)
        net.train()
        eps = torch.randn(x0.shape, generator=gen)  # [B, 3, H, W]
        sigma = torch.sigmoid(torch.randn(32, generator=gen))  # [B] logit-normal, as pretraining
        s = sigma.view(-1, 1, 1, 1)
        v = model.velocity((1 - s) * x0 + s * eps, sigma, model.encode_prompts(batch))
        loss = torch.nn.functional.mse_loss(v, eps - x0)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        if step % 10 == 0:
            log(step=step, kind="train", loss=loss.item())
        if step % args.eval_every == 0 or step == args.steps:
            evaluation(step)


def grad_agreement(args: argparse.Namespace) -> None:
    from diffrl.learner.advantages import advantages
    from diffrl.learner.algorithms.crd import CRDConfig, crd_step_loss
    from diffrl.learner.noise_levels import interpolate, velocity_target
    from diffrl.models import shapes_world
    from diffrl.models.pretrain import load_base

    torch.set_num_threads(args.threads)
    model = load_base(device="cpu")
    net = model.transformer
    log = Log(args.out)
    G, K = 4, 8
    rng = random.Random(3)
    prompts = [rng.choice(shapes_world.train_prompts()) for _ in range(G)]
    flat = [p for p in prompts for _ in range(K)]
    with torch.no_grad():
        x0 = model.sample(flat, list(range(123_000, 123_000 + G * K)), num_steps=10)  # [N, C, H, W]
    r = torch.tensor([x.partial for x in score(model, x0, flat)]).view(G, K)  # [G, K]
    a_tilde = advantages(r)[1].float()  # [G, K]
    cfg = CRDConfig(use_kl_anchor=False)
    cond = model.encode_prompts(prompts).repeat_interleave(K)
    params = list(net.parameters())

    def gradient(shared: bool, gen: torch.Generator, sigma: float) -> torch.Tensor:
        eps = torch.randn(G, 1 if shared else K, *x0.shape[1:], generator=gen)
        eps = eps.expand(G, K, *x0.shape[1:]).reshape(x0.shape)  # [N, C, H, W]
        sig = torch.full((G * K,), sigma)
        v = model.velocity(interpolate(x0, eps, sig), sig, cond)
        loss, _ = crd_step_loss(v, v.detach(), velocity_target(x0, eps), a_tilde, cfg)  # θ = p_old
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])

    for sigma in (0.9, 0.5, 0.2):
        for shared in (False, True):
            gen = torch.Generator().manual_seed(1)
            grads = [gradient(shared, gen, sigma) for _ in range(args.draws)]
            cos = [torch.nn.functional.cosine_similarity(grads[i], grads[j], dim=0).item()
                   for i in range(len(grads)) for j in range(i + 1, len(grads))]
            log(sigma=sigma, group_shared_noise=shared, draws=args.draws, mean_pairwise_cosine=float(np.mean(cos)))


def pass_at_k(args: argparse.Namespace) -> None:
    from diffrl.models.pretrain import load_base
    from diffrl.models.shapes_world import split_prompts
    from diffrl.reward_servers.scorers import shapes as shapes_scorer

    torch.set_num_threads(args.threads)
    model = load_base(device="cpu")
    prompts, k = split_prompts("eval"), args.k
    if args.noise_scale != 1.0:  # a sampling temperature: every seed's ε scaled
        initial_noise = model.initial_noise
        model.initial_noise = lambda *a, **kw: initial_noise(*a, **kw) * args.noise_scale
    flat = [p for p in prompts for _ in range(k)]
    images = model.generate(flat, list(range(777_000, 777_000 + len(flat))), num_steps=args.sample_steps,
                            guidance_scale=args.guidance_scale)  # [P*k, H, W, 3] uint8
    strict = np.array([x.strict for x in shapes_scorer.score_batch(images, flat)]).reshape(len(prompts), k)  # [P, k]
    Log(args.out)(kind="pass_at_k", k=k, sample_steps=args.sample_steps, guidance_scale=args.guidance_scale,
                  noise_scale=args.noise_scale,
                  pass_at_1=float(strict.mean()), pass_at_half_k=float((strict[:, : k // 2].max(1) > 0).mean()),
                  pass_at_k=float((strict.max(1) > 0).mean()), prompts_never_right=int((strict.max(1) == 0).sum()))


def snapshot_eval(args: argparse.Namespace) -> None:
    from diffrl.data import load_prompt_set
    from diffrl.evaluation import EvalConfig, evaluate
    from diffrl.learner import checkpoint as ckpt
    from diffrl.models.pretrain import load_base

    torch.set_num_threads(args.threads)
    model = load_base(device="cpu")
    if args.checkpoint:
        folder = Path(args.checkpoint)
        if folder.is_file():  # RUN/checkpoints/latest: the folder it names, as a resume finds it
            folder = ckpt.latest_checkpoint(folder.parent.parent)
        if args.snapshot == "theta":  # the DeepSpeed engine's module state: the UNet's own names
            state = torch.load(folder / ckpt.engine_tag("theta") / "mp_rank_00_model_states.pt", map_location="cpu",
                               weights_only=True)["module"]
        else:
            state = ckpt.load_tensors(folder / ckpt.snapshot_file(args.snapshot))
        expected = model.transformer.state_dict().keys()
        if set(state) != set(expected):
            sys.exit(f"{folder}: {args.snapshot} does not hold the whole UNet (a LoRA run?); snapshot-eval reads "
                     f"full fine-tunes ({len(set(state) & set(expected))} of {len(expected)} tensors match)")
        model.transformer.load_state_dict(state)
    m = evaluate(model, EvalConfig(seeds_per_prompt=args.seeds, grid_prompts=0, guidance_scale=1.0),
                 load_prompt_set("shapes:eval"))
    Log(args.out)(kind="snapshot_eval", checkpoint=args.checkpoint or "base", snapshot=args.snapshot if args.checkpoint
                  else "base", seeds=args.seeds, **{k: m[k] for k in ("strict", "count", "color", "shape",
                                                                       "fid_shapes", "off_palette", "images")})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="probe", required=True)
    p = sub.add_parser("lockstep", help="the real Learner on its own samples, with held-out evaluation")
    p.add_argument("out", help="output folder (probe.jsonl, the learner's checkpoints)")
    p.add_argument("--steps", type=int, default=100, help="learner steps")
    p.add_argument("--eval-every", type=int, default=25, help="held-out evaluation every N steps")
    p.add_argument("--prompts", type=int, default=0, help="train on N fixed two-kind prompts (0 = all)")
    p.add_argument("--reward", choices=("partial", "strict"), default="partial", help="the training reward")
    p.add_argument("--shuffle-rewards", action="store_true", help="permute rewards within each group (control)")
    p.set_defaults(run=lockstep)
    p = sub.add_parser("self-sft", help="flow-matching fine-tune on own samples or on renders")
    p.add_argument("out", help="output folder (probe.jsonl)")
    p.add_argument("--data", choices=("own", "renders"), default="own", help="train on own samples or renders")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    p.add_argument("--steps", type=int, default=50, help="optimizer steps (batch 32)")
    p.add_argument("--eval-every", type=int, default=25, help="held-out evaluation every N steps")
    p.add_argument("--sample-steps", type=int, default=10, help="Euler steps of the own samples")
    p.add_argument("--clamp", action="store_true", help="clamp own samples to [-1, 1] (renders' range)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.set_defaults(run=self_sft)
    p = sub.add_parser("grad-agreement", help="CRD gradient agreement across noise draws")
    p.add_argument("out", help="output folder (probe.jsonl)")
    p.add_argument("--draws", type=int, default=6, help="independent noise draws per setting")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.set_defaults(run=grad_agreement)
    p = sub.add_parser("pass-at-k", help="how often the base model gets each eval prompt right among k seeds")
    p.add_argument("out", help="output folder (probe.jsonl)")
    p.add_argument("--k", type=int, default=8, help="samples (seeds) per eval prompt")
    p.add_argument("--sample-steps", type=int, default=10, help="Euler steps (10: the recipes' training samples)")
    p.add_argument("--guidance-scale", type=float, default=1.0, help="CFG scale")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--noise-scale", type=float, default=1.0, help="multiply the initial noise (temperature)")
    p.set_defaults(run=pass_at_k)
    p = sub.add_parser("snapshot-eval", help="held-out evaluation of a checkpoint's snapshot with more seeds")
    p.add_argument("out", help="output folder (probe.jsonl)")
    p.add_argument("--checkpoint", default="", help="a learner checkpoint folder (RUN/checkpoints/step_N); "
                   "none: the base model")
    p.add_argument("--snapshot", choices=("p_samp", "p_old", "theta"), default="p_samp", help="which weights")
    p.add_argument("--seeds", type=int, default=8, help="fixed seeds per eval prompt")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.set_defaults(run=snapshot_eval)
    args, overrides = parser.parse_known_args(argv)  # key=value overrides may follow the options
    if overrides and (args.probe != "lockstep" or any(o.startswith("-") or "=" not in o for o in overrides)):
        parser.error(f"unrecognized arguments: {' '.join(overrides)} (key=value overrides are for lockstep)")
    args.overrides = overrides
    args.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
