"""Can any generator climb the shapes world's differentiable reward by its gradient? (docs/results.md, "DIDR")

The upper bound of every reward-gradient method (DIDR's proxy included): plain gradient ascent on
r(decode(g_θ(z))) for the 1-step student, no distribution matching, no anchor. Each step draws 32 training
prompts and fresh seeds and takes one AdamW step on −mean r. Every ``--every`` steps it reports, on the
held-out prompts × 2 (126 images, seeds 0..125: its own, not ``diffrl eval``'s), the CNN's P(strict) and
the detector's strict accuracy. ``--score log_prob`` ascends log P(strict) instead of P (classifier-guidance form).

    .venv/bin/python scripts/didr_direct_ascent.py [--lr 1e-4] [--steps 600] [--score prob|log_prob]
                                                   [--reward FOLDER] [--save FOLDER]

``--save`` writes the ascended generator as a diffusers pipeline (its samples are the CNN's hard negatives).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from diffrl.models.adapter import FlowModel
from diffrl.models.reward_cnn import load_reward_model
from diffrl.models.shapes_world import eval_prompts, train_prompts
from diffrl.reward_servers.scorers.shapes import score_batch


def held_out(model, net, prompts, seeds) -> tuple[float, float]:
    """(mean CNN P(strict), detector strict) of the generator's samples of (prompts, seeds)."""
    images = model.decode(model.sample(prompts, seeds, num_steps=1))  # the student's one Euler step
    with torch.no_grad():
        p_cnn = float(net.log_reward(images, prompts).exp().mean())
    strict = float(np.mean([s.strict for s in score_batch(model.to_uint8(images), prompts)]))
    return p_cnn, strict


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", default="assets/shapes-student-1step")
    p.add_argument("--reward", default="assets/shapes-reward-cnn")
    p.add_argument("--score", choices=("prob", "log_prob"), default="prob", help="ascend P(strict) or log P")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--every", type=int, default=100, help="held-out evaluation every N steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", default="", help="write the final generator here (diffusers layout)")
    args = p.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    model = FlowModel.from_pretrained(args.student, device="cpu")
    net = load_reward_model(args.reward)  # frozen
    train = train_prompts()
    held = [q for q in eval_prompts() for _ in range(2)]
    held_seeds = list(range(len(held)))
    params = [w for w in model.transformer.parameters() if w.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), weight_decay=0.01)
    rng = torch.Generator().manual_seed(args.seed)
    print("| step | train r (batch) | held-out CNN P(strict) | held-out detector strict | seconds |")
    print("| --- | --- | --- | --- | --- |")
    p_cnn, strict = held_out(model, net, held, held_seeds)
    print(f"| 0 | — | {p_cnn:.3f} | {strict:.3f} | 0 |", flush=True)
    t0, recent = time.time(), []
    for step in range(1, args.steps + 1):
        prompts = [train[i] for i in torch.randint(len(train), (args.batch,), generator=rng).tolist()]
        z = model.initial_noise(torch.randint(2**31 - 1, (args.batch,), generator=rng).tolist())
        x = z - model.velocity(z, torch.ones(args.batch), model.encode_prompts(prompts))
        log_p = net.log_reward(model.decode_differentiable(x), prompts)  # [B]
        r = log_p if args.score == "log_prob" else log_p.exp()
        opt.zero_grad()
        (-r.mean()).backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        opt.step()
        recent.append(float(r.mean()))
        if step % args.every == 0:
            p_cnn, strict = held_out(model, net, held, held_seeds)
            print(f"| {step} | {np.mean(recent):.3f} | {p_cnn:.3f} | {strict:.3f} | {time.time() - t0:.0f} |",
                  flush=True)
            recent = []
    if args.save:
        model.save_pretrained(args.save)


if __name__ == "__main__":
    main()
